r"""Hypergradient population search through Optuna: one trial per member.

:func:`run_population_study` runs a :class:`~gradhpo.PopulationSearch`
exactly as :meth:`~gradhpo.PopulationSearch.run` does (same compiled
step, scoring and selection; the same :class:`~gradhpo.PopulationResult`),
but the :math:`N` starting points come from an Optuna study and every
member is recorded as an Optuna trial:

* **Starts.** :math:`N` trials are created with ``study.ask()`` (so
  enqueued trials are used first, then the study's sampler: TPE, random,
  ...), and ``suggest(trial)`` turns each into the member's starting
  hyperparameter pytree (all of one structure).
* **Rungs.** At every selection each live member's trial gets
  ``trial.report(score, step)``, with the score :math:`s_i` of the search
  (lower is better) and the rung's step. In ``mode="halving"`` the members
  dropped there are told ``PRUNED`` (Optuna stores their last reported
  score as their value); the survivors' trials go on.
* **PBT.** A member overwritten by a copy of a better one ends its trial
  (``PRUNED``, ``gradhpo:replaced_by`` = the number of the trial that
  continues its slot); the copy goes on as a *new* trial whose
  ``gradhpo:parent`` is the trial it was copied from and
  ``gradhpo:start`` the step it starts at. Its Optuna ``params`` are the
  parent trial's ``params`` (the new trial is enqueued with them and
  asked with the parent's distributions; ``suggest`` is *not* called for
  it), so they name the sampled starting point of the lineage; what the
  member trains from — the parent's hypergradient-tuned hyperparameters
  moved by :math:`\lambda(1 \pm \sigma)` or :math:`\lambda \pm \sigma` —
  is in ``gradhpo:start_hyperparams``. A copy reports from the next rung
  on (its curve does not repeat the parent's).
* **End.** After the last step the live members are scored once more
  (also when only one is left) and told ``COMPLETE`` with that score as
  their value, so ``study.best_trial`` is the best member's trial when
  the study holds only this search's trials. A NaN final score makes the
  trial ``FAIL`` (Optuna's rule for non-finite values). If anything
  raises, the trials still open are told ``FAIL`` and the error goes on.

User attributes of every trial (all JSON):

.. list-table::
   :header-rows: 1
   :widths: 30 70

   * - attribute
     - content
   * - ``gradhpo:member``
     - the member's slot, its id in the population (``Rung.ids``)
   * - ``gradhpo:parent``
     - the trial this one was copied from (PBT), None for a starting trial
   * - ``gradhpo:start``
     - the step the trial started at (0 for a starting trial)
   * - ``gradhpo:stop``
     - the step it ended at (a rung, or ``num_steps``)
   * - ``gradhpo:status``
     - ``"dropped"`` (halving, ``PRUNED``), ``"replaced"`` (PBT,
       ``PRUNED``) or ``"complete"`` (``COMPLETE``)
   * - ``gradhpo:replaced_by``
     - (replaced trials only) the number of the copy's trial
   * - ``gradhpo:grad_evals``
     - the gradient evaluations the member spent while it was this trial:
       its ``metadata["grad_evals"]`` at the end minus at the start
       (:mod:`gradhpo.utils.cost`). The counts of all trials of a run sum
       to the population's ``grad_evals``
   * - ``gradhpo:start_hyperparams``
     - the hyperparameters the member held when the trial started
   * - ``gradhpo:hyperparams``
     - the hyperparameters it held when the trial ended (after its
       hypergradient steps)

Hyperparameters are recorded as ``{path: value}``, one entry per leaf of
the pytree, with the path written as the leaf's keys joined by ``"/"``
(``"log_l2"``, ``"layers/0/decay"``; ``"value"`` for a pytree that is a
single bare leaf). A leaf of at most ``max_recorded_size`` elements is
recorded as a float (scalar) or a nested list of floats; a larger one as
the summary ``{"shape": [...], "mean": m, "min": a, "max": b}`` over its
finite elements. Non-finite values are recorded as None.

Optuna is an optional dependency (``pip install gradhpo[optuna]``); only
this module imports it.
"""

import math
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import jax
import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from gradhpo.population import (PopulationResult, PopulationSearch,
                                Rung, batch_source)
from gradhpo.utils import validation as val
from gradhpo.utils.types import DataBatch, PyTree

MEMBER = "gradhpo:member"
PARENT = "gradhpo:parent"
START = "gradhpo:start"
STOP = "gradhpo:stop"
STATUS = "gradhpo:status"
REPLACED_BY = "gradhpo:replaced_by"
GRAD_EVALS = "gradhpo:grad_evals"
START_HYPERPARAMS = "gradhpo:start_hyperparams"
HYPERPARAMS = "gradhpo:hyperparams"


class PopulationStudyResult(NamedTuple):
    """What :func:`run_population_study` returns.

    Attributes:
      result: the :class:`~gradhpo.PopulationResult` of the search, as
        :meth:`~gradhpo.PopulationSearch.run` would return it from the same
        starting hyperparameters and key.
      best_trial: the (finished) trial of the best member.
      trials: every trial of this run, finished, in creation order.

    Example:
      >>> import gradhpo as gh
      >>> gh.PopulationStudyResult._fields
      ('result', 'best_trial', 'trials')

      :func:`run_population_study` shows one from a run.
    """
    result: PopulationResult
    best_trial: FrozenTrial
    trials: List[FrozenTrial]


# -- records ------------------------------------------------------------------

def _clean(value: Any) -> Any:
    """``tolist()`` output with non-finite floats as None."""
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _finite_or_none(x: Any) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


def hyperparams_record(hyperparams: PyTree,
                       max_recorded_size: int = 16) -> Dict[str, Any]:
    """The JSON record of a hyperparameter pytree (see the module
    docstring for the rule).

    Example:
      >>> import numpy as np
      >>> from gradhpo.integrations.population_study import (
      ...     hyperparams_record)
      >>> hyperparams_record({"l2": np.float32(0.5),
      ...                     "w": np.arange(4.0)}, max_recorded_size=3)
      {'l2': 0.5, 'w': {'shape': [4], 'mean': 1.5, 'min': 0.0, 'max': 3.0}}
    """
    out: Dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(hyperparams)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        a = np.asarray(leaf)
        if a.size <= max_recorded_size:
            out[name or "value"] = _clean(a.tolist())
            continue
        finite = a[np.isfinite(a)] if np.issubdtype(a.dtype, np.floating) \
            else a.ravel()
        out[name or "value"] = {
            "shape": list(a.shape),
            "mean": _finite_or_none(finite.mean()) if finite.size else None,
            "min": _finite_or_none(finite.min()) if finite.size else None,
            "max": _finite_or_none(finite.max()) if finite.size else None}
    return out


class _Trials:
    """The open trial of every member slot, and what it started with."""

    def __init__(self, study: "optuna.Study", max_recorded_size: int):
        self.study = study
        self.size = max_recorded_size
        self.open: Dict[int, Any] = {}          # slot -> optuna.Trial
        self.start_evals: Dict[int, float] = {}
        self.finished: Dict[int, FrozenTrial] = {}   # number -> trial
        self.orphans: List[Any] = []     # asked, not yet given a slot

    def start(self, slot: int, trial, evals: float, hyperparams: PyTree,
              step: int, parent: Optional[int]) -> None:
        trial.set_user_attr(MEMBER, slot)
        trial.set_user_attr(PARENT, parent)
        trial.set_user_attr(START, step)
        trial.set_user_attr(START_HYPERPARAMS,
                            hyperparams_record(hyperparams, self.size))
        self.open[slot] = trial
        self.start_evals[slot] = evals

    def finish(self, slot: int, evals: float, hyperparams: PyTree,
               step: int, status: str, value: Optional[float] = None,
               replaced_by: Optional[int] = None) -> FrozenTrial:
        trial = self.open.pop(slot)
        trial.set_user_attr(GRAD_EVALS, evals - self.start_evals.pop(slot))
        trial.set_user_attr(HYPERPARAMS,
                            hyperparams_record(hyperparams, self.size))
        trial.set_user_attr(STOP, step)
        trial.set_user_attr(STATUS, status)
        if replaced_by is not None:
            trial.set_user_attr(REPLACED_BY, replaced_by)
        if status == "complete":
            frozen = self.study.tell(trial, value)
        else:
            frozen = self.study.tell(trial, state=TrialState.PRUNED)
        self.finished[frozen.number] = frozen
        return frozen

    def fail_open(self) -> None:
        for trial in list(self.open.values()) + self.orphans:
            try:
                frozen = self.study.tell(trial, state=TrialState.FAIL,
                                         skip_if_finished=True)
                self.finished[frozen.number] = frozen
            except Exception:  # pragma: no cover - keep the first error
                pass
        self.open.clear()
        self.orphans.clear()


def _member(stacked: PyTree, i: int) -> PyTree:
    return jax.tree.map(lambda x: x[i], stacked)


# -- checks -------------------------------------------------------------------

def _check_study(study: Any, search: PopulationSearch) -> None:
    if not isinstance(study, optuna.Study):
        raise TypeError("study must be an optuna.Study (optuna.create_study"
                        f"(...)), got {type(study).__name__}.")
    directions = study.directions
    if len(directions) != 1:
        raise ValueError(
            "study must be single-objective (a member's value is its "
            f"score), got {len(directions)} directions.")
    if directions[0] != StudyDirection.MINIMIZE:
        raise ValueError(
            "study must have direction='minimize': population scores are "
            "lower-is-better (to maximise a metric, give the search a "
            "score_fn that returns minus the metric), got "
            f"{directions[0].name.lower()}.")
    if search.mode == "pbt":
        waiting = len(study.get_trials(deepcopy=False,
                                       states=(TrialState.WAITING,)))
        if waiting > search.size:
            raise ValueError(
                f"study has {waiting} waiting (enqueued) trials, more than "
                f"the search's size={search.size}: PBT continues copies as "
                "enqueued trials, which would be popped after the extra "
                "ones. Enqueue at most size trials.")


def _check_starts(starts: List[PyTree], trials: List[Any]) -> None:
    first = jax.tree.structure(starts[0])
    shapes = [np.shape(x) for x in jax.tree.leaves(starts[0])]
    if not shapes:
        raise ValueError(
            f"suggest must return a hyperparameter pytree with at least "
            f"one leaf; trial {trials[0].number} gave {starts[0]!r}.")
    for start, trial in zip(starts[1:], trials[1:]):
        structure = jax.tree.structure(start)
        if structure != first:
            raise ValueError(
                "suggest must return hyperparameter pytrees of one "
                f"structure: trial {trial.number} gave {structure}, trial "
                f"{trials[0].number} gave {first}.")
        for (path, leaf), shape in zip(
                jax.tree_util.tree_flatten_with_path(start)[0], shapes):
            if np.shape(leaf) != shape:
                where = jax.tree_util.keystr(path) or "(the root)"
                raise ValueError(
                    "suggest must return hyperparameter pytrees whose "
                    f"leaves have one shape per member: leaf {where} has "
                    f"shape {np.shape(leaf)} for trial {trial.number} and "
                    f"{shape} for trial {trials[0].number}.")


# -- the run ------------------------------------------------------------------

def run_population_study(search: PopulationSearch, study: "optuna.Study",
                         params: PyTree,
                         suggest: Callable[[Any], PyTree], batches,
                         num_steps: int, *,
                         score_batch: Optional[DataBatch] = None,
                         key: Optional[jax.Array] = None,
                         max_recorded_size: int = 16
                         ) -> PopulationStudyResult:
    r"""Runs ``search`` with its starting points asked from ``study`` and
    every member recorded as a trial.

    The training is exactly :meth:`~gradhpo.PopulationSearch.run`'s with
    the starts :math:`\lambda_i^{(0)} = \mathrm{suggest}(\mathrm{trial}_i)`,
    :math:`i = 1..N` (the same compiled step, scoring and selection, so no
    retracing per step; Python runs only at rung boundaries). The trial of
    member :math:`i` reports its score :math:`s_i` at every rung it
    reaches; halving prunes the dropped members' trials, PBT prunes the
    overwritten ones and continues each copy as a new trial; the live
    members are completed with their final score. The user attributes
    written and the rule for recording hyperparameters are listed in the
    tutorial :doc:`/tutorials/population` and in the docstring of
    :mod:`gradhpo.integrations.population_study`.

    Args:
      search: a :class:`~gradhpo.PopulationSearch` (``size`` :math:`N`
        trials are asked).
      study: a single-objective ``optuna.Study`` with
        ``direction="minimize"`` (scores are lower-is-better; give the
        search a ``score_fn`` returning minus a metric to maximise it).
        Enqueued trials are used first. In PBT mode the study may hold at
        most ``size`` waiting trials, and no other worker should ask from
        it during the run (copies are enqueued and popped at once).
      params: the initial parameters, shared by every member.
      suggest: ``trial -> hyperparams``; calls ``trial.suggest_*`` and
        builds the member's starting hyperparameter pytree (for example
        ``{"log_l2": jnp.array(trial.suggest_float("log_l2", -8, 2))}``).
        Every call must return a pytree of the same structure and leaf
        shapes.
      batches: as for :meth:`~gradhpo.PopulationSearch.run`: an iterable
        of ``(train_batch, val_batch)`` pairs or a callable
        ``step -> (train_batch, val_batch)``.
      num_steps: the steps every surviving member takes (int ``>= 1``).
      score_batch: the validation batch scored at rungs and at the end when
        the search has no ``score_fn`` (needed for any ``size``: the last
        member is scored too, for its trial's value).
      key: a PRNG key, as for :meth:`~gradhpo.PopulationSearch.init`.
      max_recorded_size: leaves of the hyperparameters with at most this
        many elements are recorded in full, larger ones as a summary.

    Returns:
      A :class:`~gradhpo.PopulationStudyResult`: the search's
      :class:`~gradhpo.PopulationResult`, the best member's trial and all
      the trials of the run.

    Raises:
      TypeError: ``search`` is not a :class:`~gradhpo.PopulationSearch`,
        ``study`` not an ``optuna.Study`` or ``suggest`` not callable.
      ValueError: the study is multi-objective or maximises, or
        ``score_batch`` is missing (checked before any trial is asked);
        ``suggest`` returns pytrees of different structures or leaf
        shapes (the trials asked are told ``FAIL``).

    Example:
      Three L2 penalties (log scale) from enqueued trials, halved once at
      step 2 (:math:`\eta = 3`); T1–T2 costs :math:`4\,G` per step here:

      >>> import jax.numpy as jnp, optax, optuna
      >>> import gradhpo as gh
      >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
      >>> def train_loss(w, hp, b):
      ...     return jnp.sum((w - b) ** 2) + jnp.exp(hp["log_l2"]) * jnp.sum(
      ...         w ** 2)
      >>> def val_loss(w, hp, b):
      ...     return jnp.sum((w - b) ** 2)
      >>> opt = gh.T1T2(train_loss, val_loss, optax.sgd(0.1),
      ...               optax.adam(0.05))
      >>> search = gh.PopulationSearch(opt, size=3, rung_steps=2)
      >>> study = optuna.create_study()
      >>> for v in (0.0, -4.0, 2.0):
      ...     study.enqueue_trial({"log_l2": v})
      >>> def suggest(trial):
      ...     v = trial.suggest_float("log_l2", -5.0, 3.0)
      ...     return {"log_l2": jnp.array(v)}
      >>> b = jnp.ones(3)
      >>> out = gh.run_population_study(search, study, jnp.zeros(3), suggest,
      ...                               lambda t: (b, b), 4, score_batch=b)
      >>> [t.state.name for t in study.trials]
      ['PRUNED', 'COMPLETE', 'PRUNED']
      >>> out.best_trial.params, study.best_trial.number, out.result.best_id
      ({'log_l2': -4.0}, 1, 1)
      >>> [list(t.intermediate_values) for t in study.trials]
      [[2], [2], [2]]
      >>> [t.user_attrs["gradhpo:grad_evals"] for t in study.trials]
      [8.0, 16.0, 8.0]
      >>> out.result.grad_evals
      32.0
    """
    if not isinstance(search, PopulationSearch):
        raise TypeError("search must be a gradhpo.PopulationSearch, got "
                        f"{type(search).__name__}.")
    _check_study(study, search)
    if not callable(suggest):
        raise TypeError("suggest must be a callable trial -> hyperparams "
                        f"pytree, got {type(suggest).__name__}.")
    num_steps = val.check_int(num_steps, "num_steps", minimum=1)
    max_recorded_size = val.check_int(max_recorded_size, "max_recorded_size",
                                      minimum=0)
    if search.score_fn is None and score_batch is None:
        raise ValueError(
            "score_batch must be given (a validation batch) when the search "
            "has no score_fn: every member's trial is completed with its "
            "score.")
    key = val.check_key(key)
    book = _Trials(study, max_recorded_size)
    asked: List[Any] = []
    try:
        starts = []
        for _ in range(search.size):
            asked.append(study.ask())
            starts.append(suggest(asked[-1]))
        _check_starts(starts, asked)
        pop = search.init(params, starts, key=key)
        evals = np.asarray(pop.members.metadata["grad_evals"], np.float64)
        for i, (trial, start) in enumerate(zip(asked, starts)):
            book.start(i, trial, float(evals[i]), start, 0, None)
        asked = []
        return _run(search, study, book, pop, batches, num_steps,
                    score_batch)
    except BaseException:
        book.orphans.extend(asked)
        book.fail_open()
        raise


def _run(search: PopulationSearch, study: "optuna.Study", book: _Trials,
         pop, batches, num_steps: int, score_batch) -> PopulationStudyResult:
    source = batch_source(batches, num_steps)
    rungs = set(search.rungs(num_steps))
    history = []
    for t in range(num_steps):
        if t in rungs and pop.size > 1:
            pop, rung = _select(search, study, book, pop, score_batch)
            history.append(rung)
        pop = search.step(pop, *source(t))
    scores = np.asarray(search.scores(pop, score_batch))
    best = int(np.argsort(np.where(np.isnan(scores), np.inf, scores),
                          kind="stable")[0])
    ids = np.asarray(pop.ids)
    hyperparams = jax.tree.map(np.asarray, pop.members.hyperparams)
    if pop.size > 1:
        history.append(Rung(
            step=num_steps, ids=ids, scores=scores, hyperparams=hyperparams,
            survivors=ids[best:best + 1], parents=ids[best:best + 1],
            grad_evals=float(pop.grad_evals), final=True))
    evals = np.asarray(pop.members.metadata["grad_evals"], np.float64)
    best_trial = None
    for i, slot in enumerate(ids.tolist()):
        frozen = book.finish(slot, float(evals[i]), _member(hyperparams, i),
                             num_steps, "complete", float(scores[i]))
        if i == best:
            best_trial = frozen
    result = PopulationResult(
        best=pop.member(best), best_id=int(ids[best]), history=history,
        grad_evals=float(pop.grad_evals), population=pop)
    trials = [book.finished[n] for n in sorted(book.finished)]
    return PopulationStudyResult(result, best_trial, trials)


def _select(search: PopulationSearch, study: "optuna.Study", book: _Trials,
            pop, score_batch):
    """A rung: report, select, and end / start the trials it changes."""
    scores = search.scores(pop, score_batch)
    new, rung = search.select(pop, scores)
    step = rung.step
    evals = np.asarray(pop.members.metadata["grad_evals"], np.float64)
    for slot, score in zip(rung.ids.tolist(), rung.scores.tolist()):
        book.open[slot].report(score, step)
    position = {slot: i for i, slot in enumerate(rung.ids.tolist())}
    if search.mode == "halving":
        survivors = set(rung.survivors.tolist())
        for slot, i in position.items():
            if slot not in survivors:
                book.finish(slot, float(evals[i]),
                            _member(rung.hyperparams, i), step, "dropped")
        return new, rung
    new_hyperparams = jax.tree.map(np.asarray, new.members.hyperparams)
    new_evals = np.asarray(new.members.metadata["grad_evals"], np.float64)
    for i, (slot, parent) in enumerate(zip(rung.survivors.tolist(),
                                           rung.parents.tolist())):
        if parent == slot:
            continue
        parent_trial = book.open[parent]
        distributions = parent_trial.distributions
        study.enqueue_trial(dict(parent_trial.params),
                            user_attrs={MEMBER: slot,
                                        PARENT: parent_trial.number,
                                        START: step})
        copy = study.ask(fixed_distributions=distributions)
        attrs = copy.user_attrs
        if attrs.get(PARENT) != parent_trial.number or \
                attrs.get(MEMBER) != slot or attrs.get(START) != step:
            book.orphans.append(copy)
            raise RuntimeError(
                "study gave another trial than the copy enqueued for member "
                f"{slot} (trial {copy.number}): another worker is asking "
                "from the same study, or it holds extra waiting trials.")
        book.finish(slot, float(evals[position[slot]]),
                    _member(rung.hyperparams, position[slot]), step,
                    "replaced", replaced_by=copy.number)
        book.start(slot, copy, float(new_evals[i]),
                   _member(new_hyperparams, i), step, parent_trial.number)
    return new, rung


__all__ = ["PopulationStudyResult", "hyperparams_record",
           "run_population_study"]
