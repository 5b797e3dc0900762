r"""PASHA as a stateless Optuna pruner (Bohdal et al., ICLR 2023).

PASHA runs asynchronous successive halving (ASHA) with a *maximum resource
that grows only when it has to*. Rung :math:`k` sits at step
:math:`s_k = r\,\eta^{s_0 + k}` (only :math:`s_k < R` when a cap :math:`R` is
given). Trials start with two active rungs; a trial that reaches the current
top rung :math:`T` goes no further. After every rung arrival PASHA compares
the ranking of the trials in rung :math:`T` with their ranking one rung
below; when the two disagree by more than the noise tolerance
:math:`\epsilon` (soft ranking), :math:`T` grows by one, and once
:math:`T = n` (the number of rungs below :math:`R`) the cap becomes
:math:`R` itself.

This module keeps no algorithmic state between calls: the top rung :math:`T`
and :math:`\epsilon` are recomputed from the study's trials on every rung
decision, so any number of workers sharing one storage agree on them.

The pure helpers (:func:`soft_ranking_consistent`, :func:`noisy_pair_distance`,
:func:`noisy_pair_distances`, :func:`linear_percentile`,
:func:`estimate_epsilon`) work on plain numbers and learning curves and need
no study.
"""

import bisect
import enum
import math
import numbers
from collections.abc import Mapping
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from gradhpo.utils import validation as val


_PREFIX = "pasha:"
_RUNG_KEY = _PREFIX + "rung_{}"
_PASSED_KEY = _PREFIX + "passed_{}"
# The storage id of the trial the records were written for: a copy of the
# records in another trial (a retry re-queued with the system attributes)
# is foreign and ignored.
_OWNER_KEY = _PREFIX + "owner"
_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
_DIRECTIONS = ("minimize", "maximize")


class PASHADecision(str, enum.Enum):
    """Why :meth:`PASHAPruner.prune` answered as it did.

    ``CONTINUE``: keep training (``prune`` returned False). ``PRUNE``: the
    trial lost the successive-halving test at a rung below the top rung, or
    reported NaN. ``STOP_AT_MAX``: the trial reached the current maximum
    resource; in the paper it would be paused there, here it is stopped and
    the objective may return its value as a finished result.
    """

    CONTINUE = "continue"
    PRUNE = "prune"
    STOP_AT_MAX = "stop_at_max"


# ---------------------------------------------------------------- pure maths

def _sign_of(direction) -> float:
    """+1 for minimisation, -1 for maximisation (values are multiplied)."""
    if isinstance(direction, StudyDirection):
        return -1.0 if direction == StudyDirection.MAXIMIZE else 1.0
    val.check_choice(direction, "direction", _DIRECTIONS)
    return -1.0 if direction == "maximize" else 1.0


def _finite_curve(curve) -> Dict[int, float]:
    items = curve.items() if isinstance(curve, Mapping) else enumerate(curve)
    return {int(e): float(v) for e, v in items
            if v is not None and math.isfinite(v)}


def soft_ranking_consistent(members: Iterable[Tuple[float, float]],
                            epsilon: float,
                            direction: str = "minimize") -> bool:
    r"""PASHA's soft-ranking test between the two highest rungs.

    Each member is a pair (value at rung :math:`T`, value at rung
    :math:`T-1`) for one trial of rung :math:`T`. Let :math:`A` be the
    members sorted best-first by their rung-:math:`T` value (ties broken by
    the rung-:math:`(T-1)` value, so a tie can never make the test fail),
    :math:`p(x)` a member's rung-:math:`(T-1)` value and :math:`P` the
    :math:`p` values sorted best-first. The ranking is consistent iff

    .. math::

       P_i - \epsilon \;\le\; p(A_i) \;\le\; P_i + \epsilon
       \qquad \text{for every position } i,

    which is the closed form of the reference rule "the :math:`i`-th trial
    at rung :math:`T` lies in the group of trials whose rung-:math:`(T-1)`
    values are within :math:`\epsilon` of the :math:`i`-th one".

    Args:
      members: iterable of ``(value_at_T, value_at_T_minus_1)`` pairs.
      epsilon: :math:`\epsilon \ge 0`; 0 asks for identical orders.
      direction: ``"minimize"`` or ``"maximize"``.

    Returns:
      True when the rankings agree (PASHA keeps its maximum resource).

    Example:
      >>> table = [(10.0, 10.0), (14.6, 14.2), (14.3, 14.3), (11.6, 11.6)]
      >>> soft_ranking_consistent(table, 0.3)
      True
      >>> soft_ranking_consistent(table, 0.03)
      False
    """
    epsilon = val.check_real(epsilon, "epsilon", low=0.0)
    sign = _sign_of(direction)
    ranked = sorted((sign * top, sign * prev) for top, prev in members)
    reference = sorted(prev for _, prev in ranked)
    return all(p - epsilon <= q <= p + epsilon
               for p, (_, q) in zip(reference, ranked))


def noisy_pair_distance(curve_a, curve_b, step: int) -> Optional[float]:
    r"""Distance of a pair of learning curves at ``step`` if they are noisy.

    With :math:`\sigma = \mathrm{sign}(v_a(e) - v_b(e))` at :math:`e =`
    ``step``, the pair is *noisy* when, walking back over the earlier steps
    both curves reported (step 0 included), the order is first the opposite
    of :math:`\sigma` and later, further back, :math:`\sigma` again: the
    curves crossed at least twice before :math:`e`. Equal values are "no
    order" and neither flip nor restore; NaN and infinities are ignored.

    Args:
      curve_a, curve_b: mappings step -> value, or sequences (steps 0, 1,
        ...).
      step: :math:`e`, the step at which the pair is compared.

    Returns:
      :math:`|v_a(e) - v_b(e)|` for a noisy pair, otherwise None.

    Example:
      >>> a = (0.80, 0.50, 0.45, 0.40)
      >>> b = (0.81, 0.40, 0.47, 0.30)
      >>> round(noisy_pair_distance(a, b, 3), 6)
      0.1
      >>> print(noisy_pair_distance(a, (0.78, 0.40, 0.36, 0.30), 3))
      None
    """
    a, b = _finite_curve(curve_a), _finite_curve(curve_b)
    if step not in a or step not in b:
        return None
    sigma = np.sign(a[step] - b[step])
    if sigma == 0:
        return None
    flipped = False
    for e in sorted((e for e in a if e < step and e in b), reverse=True):
        order = np.sign(a[e] - b[e])
        if not flipped and order == -sigma:
            flipped = True
        elif flipped and order == sigma:
            return abs(a[step] - b[step])
    return None


def _last_true(mask: np.ndarray) -> np.ndarray:
    """Index of the last True per row (-1 when none)."""
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    return np.where(mask.any(axis=1), last, -1)


def noisy_pair_distances(curves, low: int, high: int) -> List[float]:
    r"""Distances of all noisy pairs in the step window :math:`(low, high]`.

    Every unordered pair of curves is examined once, at the highest step
    :math:`e` of the window that both reported, with
    :func:`noisy_pair_distance`. Vectorised over pairs and steps with numpy
    (one row of the pair matrix at a time).

    Args:
      curves: mapping of any keys to curves, or a sequence of curves (a curve
        is a mapping step -> value or a sequence of values at steps 0, 1,
        ...).
      low, high: the window; for PASHA's top rung :math:`T` it is
        :math:`(s_{T-1}, s_T]`.

    Returns:
      The list of distances (order unspecified), empty when no pair is noisy.

    Example:
      >>> curves = [(0.80, 0.50, 0.45, 0.40), (0.85, 0.60),
      ...           (0.81, 0.40, 0.47, 0.30), (0.79, 0.45, 0.33, 0.25)]
      >>> sorted(round(d, 6) for d in noisy_pair_distances(curves, 1, 3))
      [0.05, 0.1]
    """
    items = curves.values() if isinstance(curves, Mapping) else curves
    members = []
    for curve in items:
        curve = {e: v for e, v in _finite_curve(curve).items() if e <= high}
        if any(e > low for e in curve):
            members.append(curve)
    if len(members) < 2:
        return []
    steps = sorted({e for curve in members for e in curve})
    column = {e: j for j, e in enumerate(steps)}
    values = np.full((len(members), len(steps)), np.nan)
    for i, curve in enumerate(members):
        for e, v in curve.items():
            values[i, column[e]] = v
    finite = ~np.isnan(values)
    in_window = np.array(steps) > low
    index = np.arange(len(steps))
    found: List[float] = []
    for i in range(len(members) - 1):
        both = finite[i] & finite[i + 1:]
        diff = np.where(both, values[i] - values[i + 1:], 0.0)
        order = np.sign(diff)
        top = _last_true(both & in_window)
        rows = np.nonzero(top >= 0)[0]
        if rows.size == 0:
            continue
        top = top[rows]
        order = order[rows]
        sigma = order[np.arange(rows.size), top]
        before = index[None, :] < top[:, None]
        same = (order == sigma[:, None]) & before
        opposite = (order == -sigma[:, None]) & before
        first_same = np.where(same.any(axis=1), np.argmax(same, axis=1),
                              len(steps))
        noisy = (sigma != 0) & (first_same < _last_true(opposite))
        gaps = np.abs(diff[rows, top])
        found.extend(gaps[noisy].tolist())
    return found


def linear_percentile(values: Sequence[float], q: float) -> float:
    r"""The ``q``-th percentile with linear interpolation (numpy's default).

    For sorted values :math:`D_0 \le \dots \le D_{m-1}` and
    :math:`h = \tfrac{q}{100}(m-1)`:
    :math:`D_{\lfloor h\rfloor} + (h - \lfloor h\rfloor)
    (D_{\lfloor h\rfloor+1} - D_{\lfloor h\rfloor})`.

    Example:
      >>> round(linear_percentile([0.01, 0.02, 0.05, 0.10], 90), 6)
      0.085
    """
    q = val.check_real(q, "q", low=0.0, high=100.0)
    if len(values) == 0:
        raise ValueError("values must hold at least one number, got an "
                         "empty sequence.")
    return float(np.percentile(np.asarray(values, dtype=float), q))


def estimate_epsilon(curves, rung_steps: Sequence[int], top_rung: int,
                     percentile: float = 90.0,
                     default: float = 0.0) -> float:
    r"""PASHA's automatic :math:`\epsilon` for top rung :math:`T`.

    .. math::

       \epsilon = Q_{q}\big\{\,|v_a(e_{ab}) - v_b(e_{ab})| :
       \{a, b\}\ \text{noisy in } (s_{w-1}, s_w]\,\big\}

    for the highest window :math:`w = T, T-1, \dots, 1` that holds a noisy
    pair (:func:`noisy_pair_distances`), :math:`Q_q` the linear percentile
    (:math:`q = 90` in the paper's code); ``default`` when no window does.
    Falling back to lower windows is the stateless form of the reference's
    "keep the previous :math:`\epsilon`".

    Args:
      curves: learning curves of all trials (see
        :func:`noisy_pair_distances`).
      rung_steps: :math:`s_0, s_1, \dots`, at least ``top_rung + 1`` steps.
      top_rung: :math:`T \ge 1`.
      percentile: :math:`q`.
      default: the value when no window holds a noisy pair.

    Example:
      >>> curves = [(0.80, 0.50, 0.45, 0.40), (0.81, 0.40, 0.47, 0.30),
      ...           (0.79, 0.45, 0.33, 0.25)]
      >>> round(estimate_epsilon(curves, [1, 3, 9], 1), 6)
      0.095
    """
    top_rung = val.check_int(top_rung, "top_rung", minimum=1)
    if len(rung_steps) <= top_rung:
        raise ValueError(f"rung_steps must hold at least top_rung + 1 = "
                         f"{top_rung + 1} steps, got {len(rung_steps)}.")
    for w in range(top_rung, 0, -1):
        found = noisy_pair_distances(curves, rung_steps[w - 1], rung_steps[w])
        if found:
            return linear_percentile(found, percentile)
    return float(default)


# ------------------------------------------------------------ study snapshot

class _Tables:
    """Rung memberships, passed flags and curves of one study snapshot.

    Rung values are stored in minimisation form (multiplied by ``sign``);
    curves keep the raw values (ε only uses differences and orders, which a
    common sign flip leaves unchanged up to sign).
    """

    def __init__(self) -> None:
        self.rungs: Dict[int, Dict[int, float]] = {}
        self.passed: Dict[int, Set[int]] = {}
        self.curves: Dict[int, Dict[int, float]] = {}

    def add_rung(self, k: int, number: int, value: float) -> None:
        self.rungs.setdefault(k, {})[number] = value

    def add_passed(self, k: int, number: int) -> None:
        self.passed.setdefault(k, set()).add(number)


def _foreign(trial: FrozenTrial) -> bool:
    """Whether ``trial`` carries PASHA records it did not earn (copied from
    another trial, e.g. by ``RetryHeartbeatStaleTrialCallback``)."""
    attrs = trial.system_attrs
    if _OWNER_KEY in attrs:
        return attrs[_OWNER_KEY] != trial._trial_id
    return "failed_trial" in attrs and any(
        key.startswith(_PREFIX) for key in attrs)


def _entries_from_attrs(attrs, n_rungs: Optional[int]
                        ) -> Tuple[Dict[int, float], Set[int]]:
    """Variant A: the rung values and passed flags the pruner wrote."""
    values: Dict[int, float] = {}
    passed: Set[int] = set()
    for key, value in attrs.items():
        if not key.startswith(_PREFIX):
            continue
        kind, _, index = key[len(_PREFIX):].rpartition("_")
        if not index.isdigit():
            continue
        k = int(index)
        if n_rungs is not None and k >= n_rungs:
            continue
        if kind == "rung" and isinstance(value, numbers.Real) \
                and not math.isnan(value):
            values[k] = float(value)
        elif kind == "passed" and value:
            passed.add(k)
    return values, passed


class PASHAPruner(optuna.pruners.BasePruner):
    r"""PASHA: successive halving whose maximum resource grows on demand.

    Rung :math:`k` is at step :math:`s_k = r\,\eta^{s_0+k}`; with a cap
    :math:`R` only the :math:`n` rungs with :math:`s_k < R` exist. The
    current *top rung* :math:`T \in \{1, \dots, n\}` sets the maximum
    resource :math:`M = s_T` (:math:`M = R` once :math:`T = n`); it starts
    at :math:`T = 1`. At each rung :math:`k` a trial reaches:

    * :math:`k \ge T`: it is stopped (``STOP_AT_MAX``);
    * :math:`k < T`: Optuna's ASHA rule: with :math:`m` values at rung
      :math:`k` (its own included) it continues iff it is at least as good
      as the :math:`\max(\lfloor m/\eta\rfloor, 1)`-th best, else
      ``PRUNE``.

    :math:`T` grows by one when the top two rungs rank their common trials
    differently beyond the noise tolerance :math:`\epsilon` (soft ranking).
    With :math:`A` the trials of rung :math:`T` sorted best-first by their
    rung-:math:`T` value, :math:`p(x)` their rung-:math:`(T-1)` value and
    :math:`P` the sorted :math:`p` values, the ranking is consistent iff

    .. math::

       P_i - \epsilon \le p(A_i) \le P_i + \epsilon \quad \forall i.

    With ``epsilon="auto"`` (the paper's ICLR version), :math:`\epsilon` is
    the ``epsilon_percentile``-th (by default 90th) percentile of
    :math:`|v_a(e) - v_b(e)|` over *noisy pairs*: pairs of learning curves
    whose order at their highest common step :math:`e` in the window
    :math:`(s_{T-1}, s_T]` was inverted at an earlier step and restored
    further back (they crossed twice), i.e. a measure of how much ranking
    noise the metric carries. Without noisy pairs in that
    window the next lower window is used, then ``epsilon_init``.

    **Stopping, not pausing.** In the paper a trial that reaches the current
    maximum is *paused*; when the maximum grows, the best paused trials are
    resumed from their checkpoints. Optuna cannot pause a trial, so this
    pruner *stops* it: ``prune`` returns True with
    :meth:`last_decision` ``== STOP_AT_MAX``. Consequences:

    * after :math:`T` grows, trials already stopped at the old top rung are
      not resumed; only running or later trials can go beyond it, and they
      must win the ordinary ASHA test there, so the new top rung fills more
      slowly than in the paper;
    * below the top rung, decisions are Optuna's arrival-time rule above,
      not the paper's paused-trial promotion quantile (the special last-rung
      quantile :math:`s_{n-1}/R` is not used);
    * a stopped finalist becomes PRUNED if the objective raises
      ``optuna.TrialPruned`` (``study.best_trial`` ignores it), or COMPLETE
      if the objective returns its value on ``STOP_AT_MAX`` (as in the
      example below); finalists of different phases were then measured at
      different resources, so prefer :func:`pasha_best_trial`, which compares
      trials only within the highest reached rung.

    Compare it with Optuna's ``SuccessiveHalvingPruner``, not with the
    paper's speed-ups.

    **No state.** :math:`T` is rebuilt from the trials on every rung
    decision: :math:`T_{floor} = \max(1, \text{highest non-empty rung},
    1 + \text{highest rung some trial passed})` (capped at :math:`n`), then
    :math:`T = T_{floor} + 1` iff rungs :math:`T_{floor}` and
    :math:`T_{floor}-1` are inconsistent. Once a trial has passed rung
    :math:`k`, :math:`T > k` for good, so :math:`T_{floor}` never decreases;
    unlike the paper's persistent counter, an increase that no trial has
    used yet (nobody passed the old top rung) is undone if the
    inconsistency vanishes again (:math:`\epsilon` grew, members arrived).
    Any number of workers sharing one storage compute the same :math:`T`. The
    pruner records a trial's rung values and passed rungs as system
    attributes ``pasha:rung_k`` / ``pasha:passed_k`` (as Optuna's own
    successive halving does), together with ``pasha:owner``, the storage id
    of the trial they were written for; trials without them (e.g. added with
    ``study.add_trial``) are read from their intermediate values, at the
    first reported step :math:`\ge s_k`. Records copied into another trial
    (a retry re-queued by ``RetryHeartbeatStaleTrialCallback``, which copies
    the system attributes) are foreign: they are ignored, cleared when the
    retry writes its first record, and the retry earns every rung again. To
    pause trials and resume them from a checkpoint instead of stopping
    them, see :mod:`gradhpo.integrations.resume`. Further deviations from the
    reference code: each unordered pair is counted once in :math:`\epsilon`
    and equal values count as "no order"; exact ties at rung :math:`T` are
    broken by the rung-:math:`(T-1)` value; with :math:`n \le 2` the cap can
    still grow to :math:`R`; FAIL trials are ignored; a trial reporting a
    step :math:`\ge R` is stopped.

    Steps are what you pass to ``trial.report`` (usually 0-based): with
    :math:`r = 1` the first rung is the second report, and a cap
    :math:`R` means steps :math:`0, \dots, R-1`. Call ``should_prune`` after
    every ``report``; a later call decides every rung crossed since the
    previous one, in order, with the values reported at the first step at or
    after each :math:`s_k`, against the trials as they are now (as Optuna's
    successive halving does). Single-objective studies only.

    Args:
      min_resource: :math:`r \ge 1`, the step of the first rung (no
        ``"auto"``: most trials are stopped before any completes).
      reduction_factor: :math:`\eta \ge 2` (the paper uses 3; Optuna's
        successive halving defaults to 4).
      min_early_stopping_rate: :math:`s_0 \ge 0`.
      max_resource: :math:`R`, the hard cap in steps, or None (no cap: the
        objective's loop ends training).
      epsilon: ``"auto"`` (estimated from ranking noise, as in the paper) or
        a fixed :math:`\epsilon \ge 0` (0: exact ranking; the reference
        tutorial's rule of thumb for metrics in [0, 1] was 0.025).
      epsilon_percentile: the percentile :math:`q` of noisy-pair distances
        (90 in the paper's code).
      epsilon_init: :math:`\epsilon` while no window has a noisy pair.
      bootstrap_count: as in Optuna: a trial is pruned at a rung below
        :math:`T` while at most this many trials (itself included) have
        reached that rung.

    Example:
      >>> import math, optuna
      >>> from gradhpo.integrations.pasha import (
      ...     PASHAPruner, PASHADecision, pasha_best_trial)
      >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
      >>> pruner = PASHAPruner(min_resource=1, reduction_factor=3,
      ...                      max_resource=27)
      >>> def objective(trial):
      ...     x = trial.suggest_float("x", -2.0, 2.0)
      ...     for step in range(27):
      ...         loss = (x - 0.5) ** 2 + 1.0 / (step + 1)
      ...         trial.report(loss, step)
      ...         if trial.should_prune():
      ...             decision = pruner.last_decision(trial.number)
      ...             if decision is PASHADecision.STOP_AT_MAX:
      ...                 return loss
      ...             raise optuna.TrialPruned()
      ...     return loss
      >>> study = optuna.create_study(pruner=pruner)
      >>> for x in [-1.5, 1.0, 0.0, 2.0, 0.6, -0.5, 0.4, 1.5, 0.45]:
      ...     study.enqueue_trial({"x": x})
      >>> study.optimize(objective, n_trials=9)
      >>> pruner.current_max_resource(study)
      3
      >>> max(t.last_step for t in study.trials)
      3
      >>> pasha_best_trial(study).params
      {'x': 0.45}

    References:
      Bohdal et al, `PASHA: Efficient HPO and NAS with Progressive Resource
      Allocation <https://arxiv.org/abs/2207.06940>`_, ICLR 2023.

      Li et al, `A System for Massively Parallel Hyperparameter Tuning
      <https://arxiv.org/abs/1810.05934>`_, MLSys 2020.
    """

    def __init__(self, min_resource: int, reduction_factor: int = 3,
                 min_early_stopping_rate: int = 0, *,
                 max_resource: Optional[int] = None,
                 epsilon="auto", epsilon_percentile: float = 90.0,
                 epsilon_init: float = 0.0,
                 bootstrap_count: int = 0) -> None:
        if isinstance(min_resource, str):
            raise TypeError(
                f"min_resource must be an int >= 1, got {min_resource!r}; "
                "PASHAPruner has no 'auto' (PASHA stops most trials before "
                "any completes, so Optuna's estimate would not resolve).")
        self._r = val.check_int(min_resource, "min_resource", minimum=1)
        self._eta = val.check_int(reduction_factor, "reduction_factor",
                                  minimum=2)
        self._s = val.check_int(min_early_stopping_rate,
                                "min_early_stopping_rate", minimum=0)
        if max_resource is not None:
            max_resource = val.check_int(max_resource, "max_resource",
                                         minimum=self._r)
        self._max_resource = max_resource
        if isinstance(epsilon, str):
            val.check_choice(epsilon, "epsilon", ("auto",))
            self._epsilon: Optional[float] = None
        else:
            self._epsilon = val.check_real(epsilon, "epsilon", low=0.0)
        self._percentile = val.check_real(
            epsilon_percentile, "epsilon_percentile", low=0.0, high=100.0)
        self._epsilon_init = val.check_real(epsilon_init, "epsilon_init",
                                            low=0.0)
        self._bootstrap = val.check_int(bootstrap_count, "bootstrap_count",
                                        minimum=0)
        self._n = None
        if max_resource is not None:
            n = 0
            while self.rung_step(n) < max_resource:
                n += 1
            self._n = n
        # In-process record of the last decision per trial number; used only
        # by last_decision(), never by the algorithm.
        self._decisions: Dict[int, PASHADecision] = {}

    # ------------------------------------------------------------ rungs
    @property
    def n_rungs(self) -> Optional[int]:
        """:math:`n`, the number of rungs below ``max_resource`` (None: no
        cap, unbounded)."""
        return self._n

    def rung_step(self, k: int) -> int:
        r"""The step :math:`s_k = r\,\eta^{s_0+k}` of rung :math:`k`."""
        return self._r * self._eta ** (self._s + k)

    def _rungs_upto(self, step: int) -> List[int]:
        ks = []
        k = 0
        while (self._n is None or k < self._n) and self.rung_step(k) <= step:
            ks.append(k)
            k += 1
        return ks

    def _entries_from_curve(self, curve: Mapping
                            ) -> Tuple[Dict[int, float], Set[int]]:
        """Variant B: rung k's value is the first reported step >= s_k."""
        steps = sorted(curve)
        values: Dict[int, float] = {}
        at: Dict[int, int] = {}
        k = 0
        while self._n is None or k < self._n:
            pos = bisect.bisect_left(steps, self.rung_step(k))
            if pos == len(steps) or math.isnan(curve[steps[pos]]):
                break
            values[k] = float(curve[steps[pos]])
            at[k] = steps[pos]
            k += 1
        passed = {k for k in values
                  if k + 1 in values or steps[-1] > at[k]}
        return values, passed

    def _value_at_rung(self, curve: Mapping, k: int) -> float:
        steps = sorted(curve)
        return float(curve[steps[bisect.bisect_left(steps,
                                                    self.rung_step(k))]])

    def _read(self, study: "optuna.Study",
              exclude: Optional[int] = None) -> Tuple[_Tables, list]:
        sign = _sign_of(study.direction)
        tables = _Tables()
        trials = [t for t in study.get_trials(deepcopy=False, states=_STATES)
                  if t.number != exclude]
        for t in trials:
            attrs = t.system_attrs
            if any(key.startswith(_PREFIX) for key in attrs) and \
                    not _foreign(t):
                values, passed = _entries_from_attrs(attrs, self._n)
            else:
                values, passed = self._entries_from_curve(
                    t.intermediate_values)
            self._add(tables, t, values, passed, sign)
        return tables, trials

    @staticmethod
    def _add(tables: _Tables, trial: FrozenTrial, values: Dict[int, float],
             passed: Set[int], sign: float) -> None:
        for k, v in values.items():
            tables.add_rung(k, trial.number, sign * v)
        for k in passed:
            tables.add_passed(k, trial.number)
        tables.curves[trial.number] = dict(trial.intermediate_values)

    # ------------------------------------------------------------ top rung
    def _floor(self, tables: _Tables) -> int:
        """T_floor: the top rung implied by memberships and passed flags."""
        floor = max([1] + [k for k, m in tables.rungs.items() if m]
                    + [k + 1 for k, s in tables.passed.items() if s])
        return floor if self._n is None else min(floor, self._n)

    def _epsilon_for(self, tables: _Tables, top: int) -> float:
        if self._epsilon is not None:
            return self._epsilon
        steps = [self.rung_step(k) for k in range(top + 1)]
        return estimate_epsilon(tables.curves, steps, top, self._percentile,
                                self._epsilon_init)

    def _top_rung(self, tables: _Tables) -> int:
        """§3.4: T from the snapshot (T = n means the cap is R)."""
        if self._n == 0:
            return 0
        floor = self._floor(tables)
        if self._n is not None and floor >= self._n:
            return floor
        top = tables.rungs.get(floor, {})
        prev = tables.rungs.get(floor - 1, {})
        members = [(top[x], prev[x]) for x in top if x in prev
                   and math.isfinite(top[x]) and math.isfinite(prev[x])]
        # Consistent at epsilon = 0 implies consistent for every epsilon, so
        # the (costlier) estimate is only needed on a disagreement.
        if len(members) < 2 or soft_ranking_consistent(members, 0.0):
            return floor
        epsilon = self._epsilon_for(tables, floor)
        return floor if soft_ranking_consistent(members, epsilon) \
            else floor + 1

    def _max_for(self, top: int) -> Optional[int]:
        if self._n is not None and top >= self._n:
            return self._max_resource
        return self.rung_step(top)

    def current_top_rung(self, study: "optuna.Study") -> int:
        """:math:`T` recomputed from ``study`` (:math:`T = n` means the cap
        is ``max_resource``)."""
        return self._top_rung(self._read(study)[0])

    def current_max_resource(self, study: "optuna.Study") -> Optional[int]:
        r"""The current maximum resource :math:`M`, in steps.

        :math:`M = s_T` for :math:`T < n`, and ``max_resource`` once
        :math:`T = n`. Reads the study; for logging and tests.
        """
        return self._max_for(self.current_top_rung(study))

    def current_epsilon(self, study: "optuna.Study") -> float:
        r"""The :math:`\epsilon` of the check between the top two rungs.

        The fixed ``epsilon``, or the automatic estimate for the window
        below :math:`T_{floor}` (the highest window that exists when the cap
        is already ``max_resource``). Reads the study; for logging and tests.
        """
        if self._epsilon is not None:
            return self._epsilon
        tables = self._read(study)[0]
        top = self._floor(tables) if self._n != 0 else 0
        if self._n is not None:
            top = min(top, self._n - 1)
        if top < 1:
            return self._epsilon_init
        return self._epsilon_for(tables, top)

    def last_decision(self, trial_number: int) -> Optional[PASHADecision]:
        """The last decision :meth:`prune` made for ``trial_number`` in this
        process (None if it made none).

        ``should_prune`` runs ``prune`` in the objective's own process, so
        there this tells a stop at the maximum resource (return the value:
        the trial becomes COMPLETE) from a lost ASHA test (raise
        ``optuna.TrialPruned``).
        """
        return self._decisions.get(trial_number)

    # ------------------------------------------------------------ prune
    def prune(self, study: "optuna.Study", trial: FrozenTrial) -> bool:
        """Decides ``trial`` (see the class docstring); True means stop."""
        decision = self._decide(study, trial)
        self._decisions[trial.number] = decision
        return decision is not PASHADecision.CONTINUE

    def _cap(self, step: int) -> PASHADecision:
        if self._max_resource is not None and step >= self._max_resource:
            return PASHADecision.STOP_AT_MAX
        return PASHADecision.CONTINUE

    def _decide(self, study: "optuna.Study",
                trial: FrozenTrial) -> PASHADecision:
        step = trial.last_step
        if step is None or self._n == 0:
            return PASHADecision.CONTINUE
        attrs = trial.system_attrs
        foreign = _foreign(trial)
        if foreign:
            attrs = {}
        pending = [k for k in self._rungs_upto(step)
                   if _RUNG_KEY.format(k) not in attrs]
        if not pending:
            # Between rungs: by the passing lock the trial may go on; no
            # storage read.
            return self._cap(step)
        curve = trial.intermediate_values
        if math.isnan(curve[step]):
            return PASHADecision.PRUNE
        sign = _sign_of(study.direction)
        tables, _ = self._read(study, exclude=trial.number)
        values, passed = _entries_from_attrs(attrs, self._n)
        self._add(tables, trial, values, passed, sign)
        storage = study._storage
        if trial.system_attrs.get(_OWNER_KEY) != trial._trial_id:
            # Neutralise copied records first, then claim the records.
            if foreign:
                for key in trial.system_attrs:
                    kind = key[len(_PREFIX):].rpartition("_")[0]
                    if key.startswith(_PREFIX) and kind in ("rung",
                                                            "passed"):
                        storage.set_trial_system_attr(
                            trial._trial_id, key,
                            None if kind == "rung" else False)
            storage.set_trial_system_attr(trial._trial_id, _OWNER_KEY,
                                          trial._trial_id)
        # Rungs crossed in one call are decided in order, and a rung value is
        # recorded only once the trial has passed the rungs below it.
        for k in pending:
            value = self._value_at_rung(curve, k)
            if math.isnan(value):
                return PASHADecision.PRUNE
            storage.set_trial_system_attr(trial._trial_id,
                                          _RUNG_KEY.format(k), value)
            tables.add_rung(k, trial.number, sign * value)
            if k >= self._top_rung(tables):
                return PASHADecision.STOP_AT_MAX
            if not self._promotable(tables.rungs[k], trial.number):
                return PASHADecision.PRUNE
            storage.set_trial_system_attr(trial._trial_id,
                                          _PASSED_KEY.format(k), True)
            tables.add_passed(k, trial.number)
        return self._cap(step)

    def _promotable(self, rung: Dict[int, float], number: int) -> bool:
        """Optuna's ASHA rule at arrival (minimisation form)."""
        competing = sorted(rung.values())
        if len(competing) <= self._bootstrap:
            return False
        index = max(len(competing) // self._eta - 1, 0)
        return rung[number] <= competing[index]


def pasha_best_trial(study: "optuna.Study",
                     pruner: Optional[PASHAPruner] = None) -> FrozenTrial:
    """The trial PASHA selects: best within the highest reached rung.

    Among the trials of the highest non-empty rung, the one with the best
    value at that rung (ties: lowest trial number). If the cap has grown to
    ``max_resource`` (:math:`T = n`) and some trials passed the last rung and
    COMPLETEd, the best of those by final value instead. Retrain the
    selected configuration with the full budget, as the paper does.

    Args:
      study: a single-objective study run with a :class:`PASHAPruner`.
      pruner: the pruner; default ``study.pruner``.

    Raises:
      ValueError: no trial has reached the first rung yet.
    """
    pruner = study.pruner if pruner is None else pruner
    if not isinstance(pruner, PASHAPruner):
        raise TypeError("pruner must be a PASHAPruner (or None with "
                        "study.pruner a PASHAPruner), got "
                        f"{type(pruner).__name__}.")
    if pruner.n_rungs == 0:
        return study.best_trial
    sign = _sign_of(study.direction)
    tables, trials = pruner._read(study)
    by_number = {t.number: t for t in trials}
    n = pruner.n_rungs
    if n is not None and pruner._top_rung(tables) >= n:
        finalists = [t for t in trials if t.state == TrialState.COMPLETE
                     and t.number in tables.passed.get(n - 1, ())
                     and t.value is not None and not math.isnan(t.value)]
        if finalists:
            return min(finalists, key=lambda t: (sign * t.value, t.number))
    reached = [k for k, members in tables.rungs.items() if members]
    if not reached:
        raise ValueError("no trial has reached the first rung (step "
                         f"{pruner.rung_step(0)}) yet.")
    members = tables.rungs[max(reached)]
    return by_number[min(members, key=lambda x: (members[x], x))]
