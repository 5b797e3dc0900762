r"""One-shot hypergradient warm starts (OHGW) inside Optuna objectives.

A bandit-style scheduler (Optuna's ``SuccessiveHalvingPruner`` = ASHA,
``HyperbandPruner``, or :class:`~gradhpo.integrations.pasha.PASHAPruner`)
samples a configuration :math:`\psi` for a trial; before the objective trains
it, :class:`OptunaWarmStart` nudges the continuous part of :math:`\psi` once
(or ``num_steps`` times) along the lookahead hypergradient of
:class:`~gradhpo.OneShotWarmStart` and returns the configuration
:math:`\psi'` to train. The scheduler is not modified: its promotion and
stopping rules see only the values the objective reports.

What is recorded where:

* ``trial.params`` keeps the *sampled* :math:`\psi` (the helper never calls
  ``suggest_*`` with other values), so the sampler's model of the search
  space stays consistent;
* ``trial.user_attrs`` receive the configuration actually trained and the
  diagnostics, under the keys ``ohgw_values``, ``ohgw_hypergradient``,
  ``ohgw_step``, ``ohgw_status`` and a few more (see
  :meth:`OptunaWarmStart.apply`).

Optuna is an optional dependency (``pip install gradhpo[optuna]``); only this
module imports it.
"""

import math
import time
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from optuna.distributions import FloatDistribution

from gradhpo.algorithms.warm_start import OneShotWarmStart
from gradhpo.core.state import float_dtype
from gradhpo.utils import validation as val
from gradhpo.utils.types import DataBatch, PyTree

#: Prefix of every user attribute the warm start writes.
PREFIX = "ohgw_"
#: The values of ``trial.user_attrs["ohgw_status"]``.
STATUSES = ("applied", "clipped", "skipped_nonfinite", "skipped_discrete")

# One bounded copy of each user warm start per search box, so that all trials
# of a study share one compiled step (the box is a trace-time constant).
_BOUNDED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def is_continuous(distribution: Any) -> bool:
    """Whether the warm start steps a parameter with this distribution.

    True for ``FloatDistribution`` without ``step``; False for
    ``IntDistribution``, ``CategoricalDistribution`` and a
    ``FloatDistribution`` with ``step`` (discrete values pass through).
    """
    return isinstance(distribution, FloatDistribution) and \
        distribution.step is None


def _to_coordinate(value: float, log: bool) -> float:
    return math.log(value) if log else float(value)


def _finite_or_none(x: Any) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


def _bounded(warm_start: OneShotWarmStart,
             box: Tuple[Tuple[str, float, float], ...]) -> OneShotWarmStart:
    """A copy of ``warm_start`` that projects onto ``box`` (cached)."""
    cache = _BOUNDED.setdefault(warm_start, {})
    if box not in cache:
        lower = {name: lo for name, lo, _ in box}
        upper = {name: hi for name, _, hi in box}
        cache[box] = type(warm_start)(
            warm_start.train_loss, warm_start.val_loss,
            warm_start.inner_optimizer, warm_start.outer_optimizer,
            step_size=warm_start.step_size, num_steps=warm_start.num_steps,
            lookahead=warm_start.lookahead, direction=warm_start.direction,
            bounds=(lower, upper))
    return cache[box]


class OptunaWarmStart:
    r"""Applies a :class:`~gradhpo.OneShotWarmStart` to an Optuna trial.

    For the trial's sampled continuous parameters :math:`\psi` (each in its
    *coordinate*: :math:`\log` value for ``FloatDistribution(log=True)``, the
    value itself otherwise), with :math:`w_0` the initial model parameters,
    :math:`B_1..B_K` the first training batches and :math:`V` a held-out
    batch:

    .. math::

       J(\psi) = L_{val}\big(\Phi^K(w_0, s_0, \psi; B_1..B_K), \psi; V\big),
       \qquad
       \psi_{j+1} = \Pi_{[l, u]}\big(\psi_j - \eta_h \nabla_\psi
       J(\psi_j)\big),\ j = 0..N-1,

    where :math:`[l, u]` is the search box in coordinates (``[log low,
    log high]`` for log distributions); the trained configuration is
    :math:`\psi' = \psi_N` mapped back (:math:`\exp` for log
    distributions). Stepping :math:`\log` lr by :math:`\Delta` multiplies
    the learning rate by :math:`e^{\Delta}`, so a step size means the same
    relative change at every scale.

    The losses and the inner optimizer of ``warm_start`` receive the
    hyperparameter pytree ``{name: coordinate}`` of the continuous names
    (see :meth:`to_hyperparams`): for a log-distributed ``"lr"``, the loss
    reads ``jnp.exp(hp["lr"])``. Discrete parameters (``IntDistribution``,
    ``CategoricalDistribution``, ``FloatDistribution`` with ``step``) are
    not in the pytree and pass through unchanged; close over them in the
    losses if they matter there.

    Everything else is the scheduler's: the trial's ``params`` keep the
    sampled :math:`\psi`, and pruning sees only what the objective reports.
    A retried trial (e.g. re-queued by
    ``optuna.storages.RetryHeartbeatStaleTrialCallback``, which copies the
    user attributes) or a second call in the same trial reuses the recorded
    :math:`\psi'` instead of recomputing it, so a retry trains the same
    configuration. With ``direction="random"``, the random direction's key
    is ``fold_in(key, trial.number)``: a different direction per trial,
    reproducible per trial number.

    Args:
      warm_start: a :class:`~gradhpo.OneShotWarmStart` built with
        ``bounds=None`` (the bounds come from the trial's distributions). Its
        step size :math:`\eta_h`, ``num_steps`` :math:`N`, ``lookahead``
        :math:`K` and ``direction`` are used as they are.
      names: the parameters to warm start (default: every parameter of the
        trial, in ``trial.params`` order; discrete ones pass through).
      key: the PRNG key the per-trial keys are folded from (default
        ``jax.random.PRNGKey(0)``); only ``direction="random"`` uses it.

    Example:
      >>> import jax.numpy as jnp, optax, optuna
      >>> import gradhpo as gh
      >>> from gradhpo.integrations.optuna import OptunaWarmStart
      >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
      >>> def train_loss(w, hp, batch):          # hp holds log lr, log wd
      ...     x, y = batch
      ...     return (0.5 * (w * x - y) ** 2
      ...             + 0.5 * jnp.exp(hp["wd"]) * w ** 2)
      >>> def val_loss(w, hp, batch):
      ...     x, y = batch
      ...     return 0.5 * (w * x - y) ** 2
      >>> warm = OptunaWarmStart(gh.OneShotWarmStart(
      ...     train_loss, val_loss,
      ...     lambda hp: optax.sgd(jnp.exp(hp["lr"])), step_size=0.1))
      >>> batch = (jnp.array(1.0), jnp.array(0.0))
      >>> def objective(trial):
      ...     trial.suggest_float("lr", 1e-3, 1.0, log=True)
      ...     trial.suggest_float("wd", 1e-3, 1.0, log=True)
      ...     trial.suggest_int("epochs", 1, 3)
      ...     values = warm.apply(trial, jnp.array(1.0), batch, batch)
      ...     return values["lr"]          # train with `values` here
      >>> study = optuna.create_study()
      >>> study.enqueue_trial({"lr": 0.1, "wd": 0.1, "epochs": 2})
      >>> study.optimize(objective, n_trials=1)
      >>> trial = study.trials[0]
      >>> trial.params["lr"], trial.user_attrs["ohgw_status"]
      (0.1, 'applied')
      >>> print(f'{trial.user_attrs["ohgw_hypergradient"]["lr"]:.4f}')
      -0.0979
      >>> print(f'{trial.user_attrs["ohgw_values"]["lr"]:.6f}')  # 0.1 e^0.00979
      0.100984
      >>> trial.user_attrs["ohgw_values"]["epochs"]
      2

    References:
      Anonymous, *One-Shot Hyper-Gradient Warm-Starts for Bandit-Style
      Hyperparameter Optimisation* (no public code).

      Akiba et al, `Optuna: A Next-generation Hyperparameter Optimization
      Framework <https://arxiv.org/abs/1907.10902>`_, KDD 2019.
    """

    def __init__(self, warm_start: OneShotWarmStart,
                 names: Optional[Sequence[str]] = None, *,
                 key: Optional[jax.Array] = None) -> None:
        if not isinstance(warm_start, OneShotWarmStart):
            raise TypeError("warm_start must be a gradhpo.OneShotWarmStart, "
                            f"got {type(warm_start).__name__}.")
        if warm_start.bounds is not None:
            raise ValueError(
                "warm_start must be built with bounds=None: the search box "
                "is taken from each trial's distributions; got bounds="
                f"{warm_start.bounds!r}.")
        self.warm_start = warm_start
        self.names = None if names is None else self._check_names(names)
        self.key = val.check_key(key)

    @staticmethod
    def _check_names(names: Sequence[str]) -> List[str]:
        if isinstance(names, str) or not all(
                isinstance(n, str) for n in names):
            raise TypeError("names must be a sequence of parameter names "
                            f"(str), got {names!r}.")
        return list(names)

    def _names(self, trial: Any, names: Optional[Sequence[str]]
               ) -> List[str]:
        if not all(hasattr(trial, a) for a in (
                "params", "distributions", "user_attrs", "set_user_attr")):
            raise TypeError(
                "trial must be an optuna Trial or FrozenTrial (the objective's "
                f"argument), got {type(trial).__name__}.")
        names = self.names if names is None else self._check_names(names)
        if names is None:
            names = list(trial.params)
        missing = [n for n in names if n not in trial.params]
        if missing:
            raise ValueError(
                f"names {missing} are not parameters of trial "
                f"{trial.number} (it has {sorted(trial.params)}); call "
                "trial.suggest_* for them before the warm start.")
        return names

    def _continuous(self, trial: Any, names: List[str]) -> List[str]:
        dists = trial.distributions
        return [n for n in names if is_continuous(dists[n])]

    def to_hyperparams(self, trial: Any,
                       values: Optional[Dict[str, Any]] = None,
                       names: Optional[Sequence[str]] = None) -> PyTree:
        """The hyperparameter pytree ``{name: coordinate}`` of the
        continuous names: ``log(value)`` for log distributions, the value
        otherwise, as float scalars (``float_dtype()``).

        Args:
          trial: the trial (its distributions decide the coordinates).
          values: the values to convert (default ``trial.params``), e.g.
            those :meth:`apply` returned, to train with.
          names: as in :meth:`apply`.
        """
        names = self._names(trial, names)
        values = trial.params if values is None else values
        dists = trial.distributions
        return {n: jnp.asarray(_to_coordinate(values[n], dists[n].log),
                               float_dtype())
                for n in self._continuous(trial, names)}

    def recorded(self, trial: Any,
                 names: Optional[Sequence[str]] = None
                 ) -> Optional[Dict[str, Any]]:
        """The values a previous :meth:`apply` recorded for this trial's
        sampled parameters, or None (nothing recorded, or recorded for
        other sampled values)."""
        names = self._names(trial, names)
        attrs = trial.user_attrs
        if PREFIX + "status" not in attrs:
            return None
        sampled = attrs.get(PREFIX + "sampled", {})
        values = attrs.get(PREFIX + "values", {})
        if any(n not in sampled or n not in values
               or sampled[n] != trial.params[n] for n in names):
            return None
        return {n: values[n] for n in names}

    def apply(self, trial: Any, params: PyTree, train_batch: DataBatch,
              val_batch: DataBatch, *,
              names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        r"""Warm-starts the trial's sampled parameters; returns
        ``{name: value to train with}``.

        Call it after the ``trial.suggest_*`` calls and before training. If
        the trial already holds a record for the same sampled values (a
        retry), that record's values are returned and nothing is computed.

        Args:
          trial: an ``optuna.Trial`` (or ``FrozenTrial``) whose parameters
            ``names`` are already sampled.
          params: :math:`w_0`, the initial model parameters the trial will
            train from (use the same for every trial: common random
            numbers).
          train_batch: :math:`B_1` (with a leading axis of length :math:`K`
            when ``lookahead > 1``).
          val_batch: :math:`V`, a held-out batch (not :math:`B_1`).
          names: overrides the ``names`` given at construction.

        Returns:
          A dict over ``names``: the warm-started value of each continuous
          parameter (clipped into ``[low, high]``; exactly ``low`` / ``high``
          where the projection acted) and the sampled value of each
          discrete one.

        The user attributes written (JSON; non-finite numbers as None):

        * ``ohgw_values``: the returned dict (the configuration trained);
        * ``ohgw_sampled``: the sampled values (as in ``trial.params``);
        * ``ohgw_hypergradient``: :math:`\nabla_\psi J(\psi_0)` per
          continuous name, in its coordinate (per unit of :math:`\log`
          value for log distributions);
        * ``ohgw_step``: :math:`\psi_N - \psi_0` per continuous name, in
          coordinates;
        * ``ohgw_space``: ``"log"`` or ``"linear"`` per continuous name;
        * ``ohgw_val_loss``: :math:`J(\psi_0)`;
        * ``ohgw_nonfinite_count``: hyper-steps skipped for a non-finite
          gradient;
        * ``ohgw_seconds``: wall time of the warm start (the first call
          for a new search box or shape includes compilation);
        * ``ohgw_config``: ``step_size``, ``num_steps``, ``lookahead``,
          ``direction``;
        * ``ohgw_status`` (written last): ``"skipped_nonfinite"`` if any
          hyper-step had a non-finite gradient (if all did, the values are
          the sampled ones), else ``"clipped"`` if the projection onto the
          search box changed a coordinate, else ``"applied"``;
          ``"skipped_discrete"`` when no name is continuous.
        """
        names = self._names(trial, names)
        previous = self.recorded(trial, names)
        if previous is not None:
            return previous
        sampled = {n: trial.params[n] for n in names}
        continuous = self._continuous(trial, names)
        dists = trial.distributions
        ws = self.warm_start
        records: Dict[str, Any] = {
            "sampled": sampled,
            "config": {"step_size": ws.step_size,
                       "num_steps": ws.num_steps,
                       "lookahead": ws.lookahead,
                       "direction": ws.direction}}
        if not continuous:
            records.update(values=dict(sampled), hypergradient={}, step={},
                           space={}, val_loss=None, nonfinite_count=0,
                           seconds=0.0, status="skipped_discrete")
            return self._record(trial, records)

        start = time.perf_counter()
        box = tuple((n, _to_coordinate(dists[n].low, dists[n].log),
                     _to_coordinate(dists[n].high, dists[n].log))
                    for n in sorted(continuous))
        bounded = _bounded(ws, box)
        psi = self.to_hyperparams(trial, names=continuous)
        key = jax.random.fold_in(self.key, trial.number % 2 ** 32)
        state = bounded.init(params, psi, key=key)
        new = bounded.step(state, train_batch, val_batch)
        new_psi, meta, own = jax.device_get(
            (new.hyperparams, new.metadata, new.algorithm_state))
        seconds = time.perf_counter() - start

        order = sorted(continuous)
        grad = {n: float(own.hypergradient[n]) for n in order}
        delta = {n: float(own.delta[n]) for n in order}
        nonfinite = int(meta["nonfinite_count"])
        dtype = np.dtype(jnp.result_type(float_dtype()))
        values = dict(sampled)
        for name, lo, hi in box:
            dist = dists[name]
            x = float(new_psi[name])
            if x <= float(np.asarray(lo, dtype)) and delta[name] != 0:
                value = dist.low
            elif x >= float(np.asarray(hi, dtype)) and delta[name] != 0:
                value = dist.high
            elif dist.log:   # relative change from the exact sampled value
                value = sampled[name] * math.exp(float(delta[name]))
            else:
                value = sampled[name] + float(delta[name])
            values[name] = float(min(max(value, dist.low), dist.high))
        if nonfinite:
            status = "skipped_nonfinite"
        elif bool(meta["clipped"]):
            status = "clipped"
        else:
            status = "applied"
        records.update(
            values=values,
            hypergradient={n: _finite_or_none(grad[n]) for n in order},
            step={n: _finite_or_none(delta[n]) for n in order},
            space={n: "log" if dists[n].log else "linear" for n in order},
            val_loss=_finite_or_none(meta["val_loss"]),
            nonfinite_count=nonfinite, seconds=seconds, status=status)
        return self._record(trial, records)

    @staticmethod
    def _record(trial: Any, records: Dict[str, Any]) -> Dict[str, Any]:
        status = records.pop("status")
        for key, value in records.items():
            trial.set_user_attr(PREFIX + key, value)
        trial.set_user_attr(PREFIX + "status", status)   # marks completion
        return dict(records["values"])


def warm_start_trial(trial: Any, warm_start: OneShotWarmStart,
                     params: PyTree, train_batch: DataBatch,
                     val_batch: DataBatch, *,
                     names: Optional[Sequence[str]] = None,
                     key: Optional[jax.Array] = None
                     ) -> Dict[str, Any]:
    r"""One call of :meth:`OptunaWarmStart.apply`: warm-starts the trial's
    sampled continuous parameters and returns the values to train with.

    .. math::

       \psi' = \Pi_{[l, u]}\big(\psi - \eta_h \nabla_\psi
       L_{val}(\Phi^K(w_0, s_0, \psi; B_{1..K}); V)\big)

    in coordinates (:math:`\log` value for log distributions); see
    :class:`OptunaWarmStart` for the records written to
    ``trial.user_attrs``.

    Args:
      trial: the trial, with ``names`` already sampled.
      warm_start: a :class:`~gradhpo.OneShotWarmStart` with ``bounds=None``.
      params: :math:`w_0`.
      train_batch: :math:`B_1` (leading axis :math:`K` if ``lookahead >
        1``).
      val_batch: :math:`V`.
      names: the parameters to warm start (default: all of the trial's).
      key: the PRNG key of the random direction, folded with the trial
        number (default ``jax.random.PRNGKey(0)``).

    Example:
      >>> import jax.numpy as jnp, optax, optuna
      >>> import gradhpo as gh
      >>> from gradhpo.integrations.optuna import warm_start_trial
      >>> def loss(w, hp, batch):
      ...     return 0.5 * (w - batch) ** 2
      >>> ws = gh.OneShotWarmStart(
      ...     loss, loss, lambda hp: optax.sgd(hp["lr"]), step_size=0.1)
      >>> trial = optuna.trial.create_trial(
      ...     params={"lr": 0.5}, value=0.0,
      ...     distributions={"lr": optuna.distributions.FloatDistribution(
      ...         0.0, 1.0)})
      >>> values = warm_start_trial(trial, ws, jnp.array(1.0),
      ...                           jnp.array(0.0), jnp.array(0.0))
      >>> print(f"{values['lr']:.3f}")   # 0.5 + 0.1 * 0.5 (dJ/dlr = -0.5)
      0.550
      >>> trial.user_attrs["ohgw_status"]
      'applied'
    """
    return OptunaWarmStart(warm_start, names, key=key).apply(
        trial, params, train_batch, val_batch)
