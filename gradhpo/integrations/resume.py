r"""Pause and resume for ASHA and PASHA on Optuna (promotion type).

Optuna has no *paused* trial state: a trial that stops is finished for good.
This module builds pause and resume on top of ordinary trials. A
configuration is trained as a *chain* of trials (segments); every segment
after the first continues from the checkpoint its predecessor wrote, so no
step is trained twice and no resource is spent again.

Scheduling is promotion-type successive halving (Li et al.), with PASHA's
growing maximum resource (Bohdal et al.) or with a fixed one (ASHA). Resources
are counted from 1: the user's ``step`` function trains unit
:math:`e = 1, 2, \dots, R` and reports the metric at resource :math:`e`.
Rung :math:`k` sits at :math:`s_k = r\,\eta^{k}` for every :math:`s_k < R`
(:math:`n` rungs). At every rung a segment reaches, the scheduler looks for
the trial to *promote*: scanning the rungs from the highest level below the
current maximum resource :math:`M` down, the best paused trial of the first
rung whose value is at least as good as the rung's promotion cutoff (the
linear :math:`q_k`-quantile of all values in the rung, :math:`q_k =
s_k/s_{k+1}`, :math:`s_n = R`, at least two values). If that is the segment
itself it simply goes on; otherwise it *pauses* (checkpoint, then ends) and
enqueues the promoted trial's continuation, which the next free worker pops.
A segment reaching :math:`R` completes. Under PASHA, :math:`M = s_T` with
the top rung :math:`T` starting at 1 and growing by one whenever, after a
report, rungs :math:`T` and :math:`T-1` rank their common trials differently
beyond the noise tolerance :math:`\epsilon` (see
:func:`gradhpo.integrations.pasha.soft_ranking_consistent`); once
:math:`T = n`, :math:`M = R`.

What a user sees in ``study.trials`` (user attributes, all JSON):

* ``gradhpo:chain`` (every segment): the number of the chain's first trial,
  which names the configuration;
* ``gradhpo:parent``: the trial this segment continues from (None for the
  first), and ``gradhpo:reason``: ``"promoted"`` or ``"retry"`` (after a
  crash of the parent);
* ``gradhpo:start``: the resource the segment started from (0: from
  scratch), ``gradhpo:saved``: the resource of its last checkpoint;
* ``gradhpo:status``, written when the segment ends: ``"paused"`` (state
  ``PRUNED``: stopped at a rung, resumable; it stays ``"paused"`` after it
  was resumed, the continuation is the trial whose parent it is),
  ``"complete"`` (state ``COMPLETE``, value at :math:`R`) or ``"duplicate"``
  (state ``PRUNED``: lost a race to continue the same parent, trained
  nothing). A ``FAIL`` segment crashed; it is continued by a ``"retry"``
  segment from its last checkpoint;
* ``gradhpo:top_rung``: the top rung :math:`T` a report of this segment
  raised (PASHA); :math:`T` is the largest recorded value (1 if none);
* ``gradhpo:worker``: host and process id of the worker that ran it;
* ``gradhpo:heartbeat`` (only with ``heartbeat_interval``): a counter, 0
  when the segment starts and incremented every ``heartbeat_interval``
  seconds while it runs; it keeps its last value when the segment ends.

A continuation is created with the parent's parameters and its intermediate
values up to the checkpoint, so the chain's last segment (its *tip*) holds
the whole learning curve: resource already spent is neither trained nor
reported again. :meth:`PausingScheduler.best_trial` follows chains and
returns a tip.

**Claims.** Any number of workers may share one storage (a journal file,
SQLite or another RDB). To continue a parent, a worker adds a ``WAITING``
trial with ``gradhpo:parent`` set; if two continuations of one parent exist
(two workers raced without the decision lock, or Optuna's
``RetryHeartbeatStaleTrialCallback`` copied a crashed segment), the one
with the lowest trial number wins (trial numbers are assigned by the
storage in creation order, so every worker that looks finds the same
winner) and the other ends as ``"duplicate"`` without training. Checkpoints
are one file per chain written with :func:`gradhpo.save_state` (atomic),
and only the winning segment of a chain runs at any time. With SQLite,
build the storage with :func:`sqlite_storage`: Optuna's default SQLite
transactions let two workers pop the same waiting trial.

**Decision lock.** With ``serialize=True`` (the default of
:class:`ResumableObjective`) the workers take turns in every *decision
section*, under a lock file in ``checkpoint_dir`` (which they share
already; Optuna's NFS-safe ``JournalFileOpenLock``): each report together
with the decisions after it (PASHA's :math:`\epsilon` and top-rung records;
at a rung: go on, or pause and claim the promoted chain), the start of a
segment (the duplicate check, retries of crashed chains), its end (promote
and claim) and :meth:`ResumableObjective.recover`. Training (``step``) and
checkpoint writes happen outside: at every rung the checkpoint is written
to ``<checkpoint>.pending`` before the lock is taken and renamed into place
right after the report inside it, so a checkpoint never runs ahead of the
reported values and a chain is claimable only once its checkpoint exists.
So the study's events form one total order, the lock order, and every
decision is made from a snapshot holding exactly the events before it: the
decisions and records are exactly those of a central scheduler (one
process, as with one worker here or in syne-tune) that processes the same
events in the same order; the workers never create two continuations of
one parent; and the :math:`\epsilon` record's clock (the number of
reports in the study) is a sequence number, strictly increasing from record
to record
(unless a segment fails: its values after its last checkpoint are dropped
and reported again). What is not determined is the order itself: which
worker's report comes first depends on timing, as it would for a central
scheduler fed by asynchronous workers. A worker killed inside a section
leaves the lock file behind (it names the holder's host and process id):
a worker of the same host that waits for it takes it over as soon as that
process is gone (the reaper's process rule); workers of other hosts only
after ``lock_grace_period`` seconds (default 30) without a change to the
file, so decisions may stall for that long. A section that lasts longer
than the grace period would be broken into (the holder warns when it finds
its lock taken over). With ``serialize=False`` sections of different
workers may overlap: a decision can miss another worker's latest report or
claim, two :math:`\epsilon` records can share a clock, and claim races are
resolved by the rule above.

**Killed workers.** A killed worker leaves its segment ``RUNNING``. Every
segment (when it starts, at every rung and when it ends) and every
:meth:`ResumableObjective.recover` call is a *reaper*: it fails (state
``FAIL``)

* at once, the ``RUNNING`` segments whose worker ran on the same host with a
  process id that no longer exists;
* on any host and with any storage (a journal file on a shared file system
  too), with ``heartbeat_interval`` or ``grace_period`` set: the segments
  whose ``gradhpo:heartbeat`` counter has not changed for more than
  ``grace_period`` seconds. Each :class:`ResumableObjective` object
  remembers, per ``RUNNING`` segment, the last counter it saw and when it
  first saw that value on its *own* monotonic clock (clocks of different
  hosts need not agree), and fails the segment when a later look of its
  own, more than ``grace_period`` after that, finds the same value
  (:meth:`ResumableObjective.watch` loops over ``recover``). A segment
  without the counter (its worker ran without a heartbeat) is left to the
  process rule. A live segment whose heartbeat cannot reach the storage for
  ``grace_period`` is failed too, and stops at its next report (the storage
  refuses writes to a finished trial; Optuna's ``optimize`` then raises
  ``ValueError("Cannot tell a FAIL trial.")`` in that worker), so choose
  the grace period well above the interval and the storage's latency.

An RDB storage built with Optuna's own heartbeat also fails such segments
(Optuna does it before each trial). Either way a retry continues the chain
from its last checkpoint; the steps trained after that checkpoint (at most
``checkpoint_every``) are trained again.
"""

import contextlib
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
import warnings
from typing import (Any, Callable, Dict, List, NamedTuple, Optional,
                    Sequence, Tuple)

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from gradhpo.integrations.pasha import (linear_percentile,
                                        noisy_pair_distances,
                                        soft_ranking_consistent)
from gradhpo.utils import validation as val
from gradhpo.utils.checkpoint import load_state, save_state
from gradhpo.utils.types import PyTree

CHAIN = "gradhpo:chain"
PARENT = "gradhpo:parent"
REASON = "gradhpo:reason"
START = "gradhpo:start"
SAVED = "gradhpo:saved"
STATUS = "gradhpo:status"
TOP = "gradhpo:top_rung"
EPSILON = "gradhpo:epsilon"
WORKER = "gradhpo:worker"
HEARTBEAT = "gradhpo:heartbeat"
HEARTBEAT_THREAD = "gradhpo-heartbeat"
LOCK_SUFFIX = "-decisions.lock"
_KINDS = ("pasha", "asha")
_logger = logging.getLogger(__name__)


def sqlite_storage(url: str, *, timeout: float = 60.0,
                   **kwargs) -> "optuna.storages.RDBStorage":
    """An Optuna SQLite storage that is safe for many worker processes.

    With the default SQLite transactions two workers can pop the same
    ``WAITING`` trial (Optuna's read-then-write of its state is not atomic
    there), so two processes would train the same segment. This storage
    opens every transaction with ``BEGIN IMMEDIATE`` (the write lock is
    taken before the read) and waits up to ``timeout`` seconds for the
    lock. Other RDBs (PostgreSQL, MySQL) and journal storages need nothing.

    Args:
      url: ``"sqlite:///path.db"``.
      timeout: seconds a transaction waits for the lock.
      kwargs: passed to ``optuna.storages.RDBStorage`` (e.g. a heartbeat).

    Example:
      >>> import os, tempfile, optuna
      >>> from gradhpo.integrations.resume import sqlite_storage
      >>> url = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "s.db")
      >>> study = optuna.create_study(storage=sqlite_storage(url))
      >>> study.enqueue_trial({"x": 1.0})
      >>> study.ask().number
      0
    """
    from sqlalchemy import event

    engine_kwargs = dict(kwargs.pop("engine_kwargs", {}))
    connect_args = dict(engine_kwargs.get("connect_args", {}))
    connect_args.setdefault("timeout", timeout)
    engine_kwargs["connect_args"] = connect_args
    storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs,
                                         **kwargs)
    engine = storage.engine

    def on_connect(dbapi_connection, record):
        dbapi_connection.isolation_level = None   # we issue BEGIN ourselves

    def on_begin(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(engine, "connect", on_connect)
    event.listen(engine, "begin", on_begin)
    engine.dispose()        # connections opened before the hooks
    return storage


class Chain(NamedTuple):
    """One configuration as seen in a study snapshot.

    ``number``: the chain's first trial; ``tip``: its latest winning
    segment; ``segments``: the winning segments in order; ``curve``: the
    learning curve ``{resource: value}`` it has earned (a crashed tip's
    values only up to its last checkpoint); ``status``: ``"running"``,
    ``"waiting"``, ``"paused"``, ``"complete"``, ``"failed"`` (awaiting a
    retry). A ``RUNNING`` tip that has already written its
    ``gradhpo:status`` (``"paused"`` or ``"complete"``, in the moment
    before Optuna sets its state) counts as such.
    """

    number: int
    tip: FrozenTrial
    segments: Tuple[FrozenTrial, ...]
    curve: Dict[int, float]
    status: str


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # pragma: no cover - another user's process
        return True
    return True


class _Heartbeat:
    """A daemon thread that increments the ``gradhpo:heartbeat`` counter of
    one RUNNING trial every ``interval`` seconds until :meth:`stop`.

    It writes through the study's storage from its own thread. Optuna 5.0's
    storages allow that: ``JournalStorage`` serialises every call with a
    ``threading.Lock`` (and appends under the backend's file lock);
    ``RDBStorage`` gives each thread its own SQLAlchemy session
    (``scoped_session``; the thread removes its session when it ends);
    ``_CachedStorage`` (the wrapper of an RDB) and ``InMemoryStorage`` take
    a lock. A write to a trial that finished meanwhile (e.g. failed by a
    reaper) raises ``UpdateFinishedTrialError`` (a journal appends the
    record first and refuses it on replay; every replayer ignores updates
    of finished trials): the thread then ends quietly. Other storage errors
    are logged and the next beat is tried.
    """

    def __init__(self, storage, trial_id: int, interval: float,
                 name: str) -> None:
        self._storage = storage
        self._trial_id = trial_id
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name,
                                        daemon=True)

    def start(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops the beats and joins the thread (no write after this)."""
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        count = 0
        try:
            while not self._stop.wait(self._interval):
                count += 1
                try:
                    self._storage.set_trial_user_attr(self._trial_id,
                                                      HEARTBEAT, count)
                except optuna.exceptions.UpdateFinishedTrialError:
                    return          # finished elsewhere: nothing to keep up
                except Exception as err:  # pragma: no cover - storage down
                    _logger.warning("heartbeat of trial id %d not written: "
                                    "%r", self._trial_id, err)
        finally:
            backend = getattr(self._storage, "_backend", self._storage)
            try:                     # this thread's RDB session, if any
                backend.remove_session()
            except Exception:  # pragma: no cover - best effort
                pass


class _DecisionLock:
    """Optuna's ``JournalFileOpenLock`` on ``path`` (NFS-safe: ``O_EXCL``;
    a lock file unchanged for ``grace`` seconds is forcibly taken over),
    plus the holder's identity written into the file and a same-host rule:
    a worker that waits while a lock file exists watches it from a thread
    and takes it over at once if its holder is a process of this host that
    no longer exists (checked like the reaper's process rule)."""

    POLL = 0.02

    def __init__(self, path: str, grace: float) -> None:
        from optuna.storages.journal import JournalFileOpenLock
        self.path = path
        with warnings.catch_warnings():          # Optuna warns below 3 s
            warnings.simplefilter("ignore")
            self._lock = JournalFileOpenLock(path[:-len(".lock")],
                                             grace_period=grace)

    def acquire(self) -> None:
        stop, watcher = threading.Event(), None
        if os.path.exists(self.path):            # held: watch the holder
            watcher = threading.Thread(target=self._watch, args=(stop,),
                                       name="gradhpo-lock-watch",
                                       daemon=True)
            watcher.start()
        try:
            self._lock.acquire()
        finally:
            stop.set()
            if watcher is not None:
                watcher.join()
        owner = json.dumps({"host": socket.gethostname(),
                            "pid": os.getpid(), "id": uuid.uuid4().hex})
        try:
            fd = os.open(self.path, os.O_WRONLY)
        except OSError:  # pragma: no cover - taken over at once
            return
        try:
            os.write(fd, owner.encode())
        finally:
            os.close(fd)

    def release(self) -> None:
        """Raises RuntimeError if the lock file is gone (taken over)."""
        self._lock.release()

    def _watch(self, stop: threading.Event) -> None:
        host = socket.gethostname()
        while not stop.wait(self.POLL):
            try:
                with open(self.path, "rb") as f:
                    text = f.read()
                owner = json.loads(text)
                dead = owner["host"] == host and not _alive(owner["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue             # free, being written, or foreign
            if dead and not stop.is_set():
                try:
                    self._take_over(text)
                except OSError as err:  # pragma: no cover - best effort
                    _logger.warning("decision lock %s: %r", self.path, err)

    def _take_over(self, text: bytes) -> None:
        """Removes the lock file if it still holds ``text``; a file that
        changed meanwhile (a new holder) is put back."""
        aside = f"{self.path}.{uuid.uuid4().hex}.dead"
        try:
            os.rename(self.path, aside)     # atomic: one taker wins
        except OSError:
            return
        same = False
        try:
            with open(aside, "rb") as f:
                same = f.read() == text
            if not same:
                try:
                    os.link(aside, self.path)
                except OSError:  # pragma: no cover - a race of three
                    _logger.warning("decision lock %s: a live holder's "
                                    "lock could not be put back.",
                                    self.path)
        finally:
            os.unlink(aside)
        if same:
            _logger.warning("decision lock %s: its holder (%s) is a dead "
                            "process of this host; taken over.", self.path,
                            text.decode(errors="replace"))


def _earned(trial: FrozenTrial) -> Dict[int, float]:
    curve = dict(trial.intermediate_values)
    if trial.state == TrialState.FAIL:
        saved = trial.user_attrs.get(SAVED, 0)
        curve = {e: v for e, v in curve.items() if e <= saved}
    return curve


def _snapshot(study: "optuna.Study") -> Tuple[List[Chain], Dict]:
    """Chains of ``study`` and the winner of every claim key."""
    trials = study.get_trials(deepcopy=False)
    winners: Dict[Tuple[int, Optional[int]], FrozenTrial] = {}
    for t in trials:
        if CHAIN not in t.user_attrs:
            continue
        key = (t.user_attrs[CHAIN], t.user_attrs.get(PARENT))
        if key not in winners or t.number < winners[key].number:
            winners[key] = t
    chains = []
    for (number, parent), head in winners.items():
        if parent is not None or head.number != number:
            continue
        segments = [head]
        while (number, segments[-1].number) in winners:
            segments.append(winners[(number, segments[-1].number)])
        tip = segments[-1]
        status = {TrialState.RUNNING: "running",
                  TrialState.WAITING: "waiting",
                  TrialState.COMPLETE: "complete",
                  TrialState.FAIL: "failed"}.get(tip.state, "paused")
        if status == "running" and tip.user_attrs.get(STATUS) in (
                "paused", "complete"):
            # Decided (and checkpointed) already; Optuna sets the state
            # only when the objective returns, after the decision lock.
            status = tip.user_attrs[STATUS]
        chains.append(Chain(number, tip, tuple(segments), _earned(tip),
                            status))
    chains.sort(key=lambda c: c.number)
    return chains, winners


class PausingScheduler:
    r"""Promotion-type ASHA or PASHA whose decisions are read from a study.

    Holds the rung levels and the promotion and top-rung rules; keeps no
    state between calls (everything is recomputed from the study, so workers
    sharing a storage agree). Use it with :class:`ResumableObjective`; its
    methods also answer questions about a finished study.

    Args:
      min_resource: :math:`r \ge 1`, the first rung.
      reduction_factor: :math:`\eta \ge 2`.
      max_resource: :math:`R > r`, the resource at which a chain completes.
      kind: ``"pasha"`` (growing maximum resource) or ``"asha"`` (:math:`M
        = R` from the start).
      epsilon: PASHA's noise tolerance: ``"auto"`` (the 90th percentile of
        noisy-pair distances, see
        :func:`gradhpo.integrations.pasha.estimate_epsilon`) or a number.
      epsilon_percentile, epsilon_init: as for
        :class:`~gradhpo.integrations.pasha.PASHAPruner`.

    Example:
      >>> from gradhpo.integrations.resume import PausingScheduler
      >>> sched = PausingScheduler(1, 3, max_resource=100)
      >>> sched.rung_levels
      [1, 3, 9, 27, 81]
      >>> [sched.max_resource_for(t) for t in range(1, 6)]
      [3, 9, 27, 81, 100]
    """

    def __init__(self, min_resource: int, reduction_factor: int = 3, *,
                 max_resource: int, kind: str = "pasha",
                 epsilon="auto", epsilon_percentile: float = 90.0,
                 epsilon_init: float = 0.0) -> None:
        self.min_resource = val.check_int(min_resource, "min_resource",
                                          minimum=1)
        self.reduction_factor = val.check_int(
            reduction_factor, "reduction_factor", minimum=2)
        self.max_resource = val.check_int(max_resource, "max_resource",
                                          minimum=self.min_resource + 1)
        val.check_choice(kind, "kind", _KINDS)
        self.kind = kind
        if isinstance(epsilon, str):
            val.check_choice(epsilon, "epsilon", ("auto",))
            self.epsilon: Optional[float] = None
        else:
            self.epsilon = val.check_real(epsilon, "epsilon", low=0.0)
        self.epsilon_percentile = val.check_real(
            epsilon_percentile, "epsilon_percentile", low=0.0, high=100.0)
        self.epsilon_init = val.check_real(epsilon_init, "epsilon_init",
                                           low=0.0)
        levels = []
        s = self.min_resource
        while s < self.max_resource:
            levels.append(s)
            s *= self.reduction_factor
        self.rung_levels: List[int] = levels

    @property
    def n_rungs(self) -> int:
        """:math:`n`, the number of rungs below ``max_resource``."""
        return len(self.rung_levels)

    def max_resource_for(self, top_rung: int) -> int:
        """:math:`M = s_T` for :math:`T < n`, ``max_resource`` otherwise."""
        if self.kind == "asha" or top_rung >= self.n_rungs:
            return self.max_resource
        return self.rung_levels[top_rung]

    def _quantile(self, k: int) -> float:
        nxt = self.rung_levels[k + 1] if k + 1 < self.n_rungs \
            else self.max_resource
        return self.rung_levels[k] / nxt

    # ------------------------------------------------------------ top rung
    def _latest_epsilon(self, winners: Dict) -> float:
        if self.epsilon is not None:
            return self.epsilon
        records = [(t.user_attrs[EPSILON][0], t.number,
                    t.user_attrs[EPSILON][1]) for t in winners.values()
                   if EPSILON in t.user_attrs]
        return max(records)[2] if records else self.epsilon_init

    def _new_epsilon(self, chains: Sequence[Chain], winners: Dict,
                     step: int) -> Optional[Tuple[int, float]]:
        """After a report at ``step``: ``[clock, epsilon]`` to record, or
        None (no noisy pair in the current window, or no change)."""
        if self.kind == "asha" or self.epsilon is not None:
            return None
        recorded = self._recorded_top(winners)
        if recorded >= self.n_rungs:
            return None
        low, high = (self.rung_levels[recorded - 1],
                     self.rung_levels[recorded])
        if not low < step <= high:
            return None         # the window's pairs did not change
        found = noisy_pair_distances([c.curve for c in chains], low, high)
        if not found:
            return None
        epsilon = linear_percentile(found, self.epsilon_percentile)
        if epsilon == self._latest_epsilon(winners):
            return None
        return sum(len(c.curve) for c in chains), epsilon

    def _recorded_top(self, winners: Dict) -> int:
        recorded = max([1] + [int(t.user_attrs[TOP])
                              for t in winners.values()
                              if TOP in t.user_attrs])
        return min(recorded, self.n_rungs)

    def _top(self, study: "optuna.Study", chains: Sequence[Chain],
             winners: Dict, epsilon: Optional[float] = None
             ) -> Tuple[int, int]:
        """(recorded T, T after the check now); equal unless it grows."""
        if self.kind == "asha" or self.n_rungs <= 1:
            return self.n_rungs, self.n_rungs
        recorded = self._recorded_top(winners)
        if recorded >= self.n_rungs:
            return recorded, recorded
        sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
        top, prev = (self.rung_levels[recorded],
                     self.rung_levels[recorded - 1])
        members = [(c.curve[top], c.curve[prev]) for c in chains
                   if top in c.curve and prev in c.curve
                   and math.isfinite(c.curve[top])
                   and math.isfinite(c.curve[prev])]
        direction = "maximize" if sign < 0 else "minimize"
        if len(members) < 2 or soft_ranking_consistent(members, 0.0,
                                                       direction):
            return recorded, recorded
        if epsilon is None:
            epsilon = self._latest_epsilon(winners)
        if soft_ranking_consistent(members, epsilon, direction):
            return recorded, recorded
        return recorded, recorded + 1

    def current_top_rung(self, study: "optuna.Study") -> int:
        """:math:`T` as the next report would see it (:math:`n` for ASHA)."""
        chains, winners = _snapshot(study)
        return self._top(study, chains, winners)[1]

    def current_max_resource(self, study: "optuna.Study") -> int:
        """:math:`M` for :meth:`current_top_rung`."""
        return self.max_resource_for(self.current_top_rung(study))

    # ------------------------------------------------------------ promotion
    def _promote(self, study: "optuna.Study", chains: Sequence[Chain],
                 max_resource: int, pausing: Optional[int] = None
                 ) -> Optional[Chain]:
        """The chain to promote now, or None. ``pausing``: the chain whose
        running tip just reached a rung (a candidate like paused ones)."""
        sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0

        def key(v: float) -> float:
            return sign * v if math.isfinite(v) else 1e300

        for k in range(self.n_rungs - 1, -1, -1):
            level = self.rung_levels[k]
            if level >= max_resource:
                continue
            values = [key(c.curve[level]) for c in chains
                      if level in c.curve]
            if len(values) < 2:
                continue
            cutoff = float(np.quantile(values, self._quantile(k)))
            paused = [c for c in chains if level in c.curve
                      and max(c.curve) == level and (
                          c.number == pausing or c.status == "paused")]
            if not paused:
                continue
            best = min(paused, key=lambda c: (key(c.curve[level]), c.number))
            if key(best.curve[level]) <= cutoff and key(
                    best.curve[level]) < 1e300:
                return best
        return None

    # ------------------------------------------------------------ queries
    def chains(self, study: "optuna.Study") -> List[Chain]:
        """The configurations of ``study``, as :class:`Chain` records."""
        return _snapshot(study)[0]

    def best_trial(self, study: "optuna.Study") -> FrozenTrial:
        """The tip of the selected chain: among completed chains the best
        final value; otherwise the best value at the highest rung any chain
        reached (ties: the lower chain number).

        Raises:
          ValueError: no chain has reached the first rung.
        """
        chains = _snapshot(study)[0]
        sign = -1.0 if study.direction == StudyDirection.MAXIMIZE else 1.0
        levels = self.rung_levels + [self.max_resource]
        for level in reversed(levels):
            reached = [c for c in chains if level in c.curve
                       and math.isfinite(c.curve[level])]
            if reached:
                best = min(reached, key=lambda c: (sign * c.curve[level],
                                                   c.number))
                return best.tip
        raise ValueError("no configuration has reached the first rung "
                         f"(resource {self.rung_levels[0]}) yet.")


class ResumableObjective:
    r"""An Optuna objective that trains chains of segments with pause and
    resume (see the module docstring for the records it writes).

    The user gives two functions: ``init(trial) -> state`` builds the
    initial training state (call ``trial.suggest_*`` here; the parameters of
    a continuation are the parent's) and ``step(trial, state, e) -> (state,
    value)`` trains resource unit :math:`e \ge 1` and returns the new state
    and the metric at resource :math:`e`. The state is any pytree of numeric
    arrays that :func:`gradhpo.save_state` accepts (a
    :class:`~gradhpo.BilevelState`, or a dict with the model, the data
    position and the PRNG key): everything the loop needs to continue
    exactly. The objective reports :math:`e` as the step, decides at every
    rung, and checkpoints to ``checkpoint_dir`` (one file per chain, holding
    the state and :math:`e`) when it pauses (with ``serialize``: at every
    rung it reaches) and every ``checkpoint_every`` units.

    Args:
      init: ``trial -> state``.
      step: ``(trial, state, e) -> (state, value)``.
      scheduler: a :class:`PausingScheduler`.
      checkpoint_dir: an existing directory shared by all workers.
      checkpoint_every: also checkpoint every this many units (bounds the
        work a killed worker loses); None: only when pausing.
      max_retries: a chain whose segments failed more often than this is
        left failed.
      on_report: optional ``(trial, e, value, max_resource)`` callback after
        every report and the decisions it led to (logging; called outside
        the decision lock, also when the segment then pauses).
      heartbeat_interval: seconds between the beats of a daemon thread that,
        while a segment runs, increments its ``gradhpo:heartbeat`` user
        attribute through the study's storage (the thread is stopped and
        joined when the segment ends in any way); None: no heartbeat. Each
        beat is one storage write (with a journal, one record that every
        worker replays), so seconds to a minute suit long segments.
      grace_period: seconds a ``RUNNING`` segment's counter may stay
        unchanged, as timed by this objective's own clock, before this
        objective fails it (see the module docstring); more than
        ``heartbeat_interval`` (a few times it, plus the storage's write
        latency, is safe). Default: ``4 * heartbeat_interval``; None
        without an interval: no heartbeat rule. Given without
        ``heartbeat_interval``, the objective reaps by heartbeat but does
        not beat itself. Use the same values in all workers.
      serialize: take a lock shared by all workers around every decision
        section (each report with the decisions after it; the start and the
        end of a segment; :meth:`recover`), so that workers decide one at a
        time, each from a snapshot holding every event before it (see the
        module docstring). The lock is the file :meth:`lock_path` in
        ``checkpoint_dir`` (Optuna's ``JournalFileOpenLock``: NFS-safe,
        created with ``O_EXCL``); it is never held while ``step`` trains or
        while a checkpoint is written (at a rung the checkpoint is written
        before and renamed into place inside). Costs a few file-system
        calls per report. False: the sections of different workers may
        overlap
        (decisions from snapshots that can miss each other's latest events;
        claim races end as duplicates). Use the same value in all workers.
      lock_grace_period: seconds after which a worker waiting for the lock
        forcibly takes over a lock file that has not changed meanwhile (its
        holder was killed inside a section; a holder of the same host whose
        process is gone is replaced at once). Must exceed the longest
        decision section (milliseconds on a local disk; storage latency
        counts), else two workers may decide at once.

    Example:
      >>> import tempfile, numpy as np, optuna
      >>> from gradhpo.integrations.resume import (
      ...     PausingScheduler, ResumableObjective)
      >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
      >>> sched = PausingScheduler(1, 3, max_resource=9, kind="asha")
      >>> def init(trial):
      ...     trial.suggest_float("x", 0.0, 1.0)
      ...     return {"w": np.zeros(())}
      >>> def step(trial, state, e):
      ...     w = state["w"] + 1.0                   # one unit of training
      ...     return {"w": w}, trial.params["x"] + 1.0 / w
      >>> objective = ResumableObjective(init, step, sched,
      ...                                checkpoint_dir=tempfile.mkdtemp())
      >>> study = optuna.create_study()
      >>> for x in (0.3, 0.1, 0.2, 0.4):
      ...     study.enqueue_trial({"x": x})
      >>> study.optimize(objective, n_trials=6)
      >>> for t in study.trials:
      ...     print(t.number, t.params["x"], t.state.name,
      ...           t.user_attrs["gradhpo:status"],
      ...           t.user_attrs["gradhpo:parent"],
      ...           t.user_attrs["gradhpo:start"], t.last_step)
      0 0.3 PRUNED paused None 0 1
      1 0.1 PRUNED paused None 0 3
      2 0.2 PRUNED paused None 0 1
      3 0.4 PRUNED paused None 0 1
      4 0.2 PRUNED paused 2 1 3
      5 0.1 COMPLETE complete 1 3 9

    Trial 1 (x = 0.1) is promoted in place at rung 1 and pauses at 3,
    alone there; trial 3 makes x = 0.2 promotable at rung 1, so it pauses
    and trial 4 continues x = 0.2 from resource 1; at rung 3 x = 0.1 is now
    promotable, and trial 5 trains it from 3 to 9, with the whole curve:

      >>> sorted(study.trials[5].intermediate_values)
      [1, 2, 3, 4, 5, 6, 7, 8, 9]
      >>> sched.best_trial(study).params
      {'x': 0.1}
    """

    def __init__(self, init: Callable[[Any], PyTree],
                 step: Callable[[Any, PyTree, int], Tuple[PyTree, float]],
                 scheduler: PausingScheduler, *, checkpoint_dir: str,
                 checkpoint_every: Optional[int] = None,
                 max_retries: int = 3,
                 on_report: Optional[Callable] = None,
                 heartbeat_interval: Optional[float] = None,
                 grace_period: Optional[float] = None,
                 serialize: bool = True,
                 lock_grace_period: float = 30.0) -> None:
        if not callable(init) or not callable(step):
            raise TypeError("init and step must be callables.")
        if not isinstance(scheduler, PausingScheduler):
            raise TypeError("scheduler must be a PausingScheduler, got "
                            f"{type(scheduler).__name__}.")
        if not os.path.isdir(checkpoint_dir):
            raise ValueError(f"checkpoint_dir {checkpoint_dir!r} is not an "
                             "existing directory.")
        if checkpoint_every is not None:
            checkpoint_every = val.check_int(checkpoint_every,
                                             "checkpoint_every", minimum=1)
        self.init = init
        self.step = step
        self.scheduler = scheduler
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every
        self.max_retries = val.check_int(max_retries, "max_retries",
                                         minimum=0)
        self.on_report = on_report
        if heartbeat_interval is not None:
            heartbeat_interval = val.check_real(
                heartbeat_interval, "heartbeat_interval", low=0.0,
                low_open=True)
        if grace_period is not None:
            grace_period = val.check_real(grace_period, "grace_period",
                                          low=0.0, low_open=True)
            if heartbeat_interval is not None and \
                    grace_period <= heartbeat_interval:
                raise ValueError(
                    "grace_period must be greater than heartbeat_interval "
                    f"({heartbeat_interval!r}; a few times it is safer), "
                    f"got {grace_period!r}.")
        elif heartbeat_interval is not None:
            grace_period = 4.0 * heartbeat_interval
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        if not isinstance(serialize, bool):
            raise TypeError("serialize must be a bool, got "
                            f"{type(serialize).__name__}.")
        self.serialize = serialize
        self.lock_grace_period = val.check_real(
            lock_grace_period, "lock_grace_period", low=0.0, low_open=True)
        self._init_reaper()

    def _init_reaper(self) -> None:
        # (study name, trial id) -> (datetime_start, counter, first seen on
        # this process's monotonic clock); only RUNNING trials are kept.
        self._seen: Dict[Tuple[str, int], Tuple[Any, Any, float]] = {}
        self._seen_lock = threading.Lock()

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        del state["_seen"], state["_seen_lock"]
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_reaper()

    # ------------------------------------------------------------ helpers
    @staticmethod
    def _stem(study: "optuna.Study") -> str:
        return "".join(ch if ch.isalnum() or ch in "-_." else "_"
                       for ch in study.study_name)

    def checkpoint_path(self, study: "optuna.Study", chain: int) -> str:
        """The checkpoint file of ``chain`` in ``study``."""
        return os.path.join(self.checkpoint_dir,
                            f"{self._stem(study)}-chain{chain}.npz")

    def lock_path(self, study: "optuna.Study") -> str:
        """The decision lock file of ``study`` (it exists only while a
        worker holds the lock; see ``serialize``)."""
        return os.path.join(self.checkpoint_dir,
                            self._stem(study) + LOCK_SUFFIX)

    @contextlib.contextmanager
    def _decision(self, study: "optuna.Study"):
        """A decision section: holds the study's lock (``serialize``) and
        releases it however the section ends."""
        if not self.serialize:
            yield
            return
        lock = _DecisionLock(self.lock_path(study), self.lock_grace_period)
        lock.acquire()
        try:
            yield
        finally:
            try:
                lock.release()
            except RuntimeError:   # taken over: held beyond the grace
                _logger.warning(
                    "decision lock %s was taken over by another worker "
                    "while this one held it (a section lasted longer than "
                    "lock_grace_period=%r s).", lock.path,
                    self.lock_grace_period)

    def _save(self, trial, chain: int, state: PyTree, e: int) -> None:
        save_state(self.checkpoint_path(trial.study, chain),
                   {"state": state, "step": np.asarray(e, np.int64)})
        trial.set_user_attr(SAVED, e)

    def _reap(self, study: "optuna.Study",
              own: Optional[int] = None) -> None:
        """Fails RUNNING segments of dead workers: by process id on this
        host, and (with a grace period) by a heartbeat counter that this
        objective has seen unchanged for longer than ``grace_period``."""
        host = socket.gethostname()
        now = time.monotonic()
        running = study.get_trials(deepcopy=False,
                                   states=(TrialState.RUNNING,))
        dead = []
        for t in running:
            if t._trial_id == own:
                continue
            worker = t.user_attrs.get(WORKER)
            if not worker or worker.get("host") != host:
                continue
            pid = worker.get("pid")
            if pid == os.getpid() or _alive(pid):
                continue
            dead.append(t._trial_id)
        with self._seen_lock:
            name = study.study_name
            ids = {t._trial_id for t in running}
            for key in [k for k in self._seen
                        if k[0] == name and k[1] not in ids]:
                del self._seen[key]    # no longer RUNNING: forget it
            for t in running:
                count = t.user_attrs.get(HEARTBEAT)
                if count is None or t._trial_id in dead:
                    continue           # no heartbeat: the pid rule only
                key = (name, t._trial_id)
                seen = self._seen.get(key)
                if seen is None or seen[:2] != (t.datetime_start, count):
                    self._seen[key] = (t.datetime_start, count, now)
                elif (self.grace_period is not None and t._trial_id != own
                      and now - seen[2] > self.grace_period):
                    dead.append(t._trial_id)
                    del self._seen[key]
        for trial_id in dead:
            try:
                study._storage.set_trial_state_values(
                    trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass

    def _claim(self, study: "optuna.Study", winners: Dict,
               parent: FrozenTrial, reason: str,
               curve: Dict[int, float]) -> bool:
        """Adds the continuation of ``parent`` unless one exists."""
        chain = parent.user_attrs[CHAIN]
        if (chain, parent.number) in winners:
            return False
        study.add_trial(optuna.trial.create_trial(
            state=TrialState.WAITING, params=parent.params,
            distributions=parent.distributions,
            intermediate_values=curve,
            user_attrs={CHAIN: chain, PARENT: parent.number,
                        REASON: reason, SAVED: max(curve, default=0)}))
        return True

    def _service(self, study: "optuna.Study", chains, winners) -> None:
        """Enqueues retries of crashed tips; returns how many."""
        count = 0
        for c in chains:
            if c.status != "failed":
                continue
            fails = sum(s.state == TrialState.FAIL for s in c.segments)
            if fails <= self.max_retries:
                count += self._claim(study, winners, c.tip, "retry",
                                     c.curve)
        return count

    def recover(self, study: "optuna.Study") -> int:
        """Fails the segments of dead workers and enqueues a retry of every
        crashed chain; returns the number enqueued.

        A segment is dead if it is ``RUNNING`` and its worker ran on this
        host with a process id that is gone, or (``grace_period`` set) its
        ``gradhpo:heartbeat`` counter has not changed between calls of this
        objective (:meth:`recover`, or a segment starting, reaching a rung
        or ending) that are more than ``grace_period`` apart on this
        process's clock. The first call only takes note of the counters: to
        fail a worker killed on another host, call again after the grace
        period, or use :meth:`watch`. A segment without a counter (its
        worker ran without a heartbeat) is failed only by the process rule.

        Segments do this themselves when they start and end; call it
        before a last run over the queue (e.g. after all workers exited).
        """
        with self._decision(study):
            self._reap(study)
            chains, winners = _snapshot(study)
            return self._service(study, chains, winners)

    def watch(self, study: "optuna.Study", *, duration: float,
              poll: Optional[float] = None,
              stop_when_idle: bool = False) -> int:
        """Calls :meth:`recover` every ``poll`` seconds for ``duration``
        seconds (a reaper loop, e.g. in a monitoring process or after the
        workers exited); returns the number of retries enqueued.

        Args:
          study: the study.
          duration: seconds to watch (0: one call of :meth:`recover`).
            To fail a segment whose counter stopped, it must exceed
            ``grace_period`` plus ``poll``.
          poll: seconds between calls; None: ``grace_period / 4``.
          stop_when_idle: return as soon as no segment is ``RUNNING``.

        Raises:
          ValueError: this objective has no ``grace_period``.
        """
        if self.grace_period is None:
            raise ValueError("watch needs a grace_period (or a "
                             "heartbeat_interval) on the ResumableObjective.")
        duration = val.check_real(duration, "duration", low=0.0)
        if poll is None:
            poll = self.grace_period / 4.0
        poll = val.check_real(poll, "poll", low=0.0, low_open=True)
        end = time.monotonic() + duration
        count = 0
        while True:
            count += self.recover(study)
            left = end - time.monotonic()
            if left <= 0 or (stop_when_idle and not study.get_trials(
                    deepcopy=False, states=(TrialState.RUNNING,))):
                return count
            time.sleep(min(poll, left))

    # ------------------------------------------------------------ the loop
    def __call__(self, trial: "optuna.Trial") -> float:
        study = trial.study
        # Before the start section (which may wait for the lock): a worker
        # killed while waiting leaves a segment that the reapers can fail
        # and retry.
        trial.set_user_attr(WORKER, {"host": socket.gethostname(),
                                     "pid": os.getpid()})
        if CHAIN not in trial.user_attrs:               # a new chain,
            trial.set_user_attr(CHAIN, trial.number)    # still empty
            trial.set_user_attr(PARENT, None)
            trial.set_user_attr(SAVED, 0)
        chain = trial.user_attrs[CHAIN]
        parent = trial.user_attrs.get(PARENT)
        beat = None
        if self.heartbeat_interval is not None:
            trial.set_user_attr(HEARTBEAT, 0)
            beat = _Heartbeat(
                study._storage, trial._trial_id, self.heartbeat_interval,
                f"{HEARTBEAT_THREAD}-{study.study_name}-{trial.number}"
            ).start()
        try:
            with self._decision(study):
                self._reap(study, own=trial._trial_id)
                chains, winners = _snapshot(study)
                if winners[(chain, parent)].number != trial.number:
                    trial.set_user_attr(STATUS, "duplicate")
                    raise optuna.TrialPruned(
                        "another trial continues this parent")
                self._service(study, chains, winners)
            return self._train(trial, chain, parent)
        finally:
            if beat is not None:
                beat.stop()

    def _train(self, trial: "optuna.Trial", chain: int,
               parent: Optional[int]) -> float:
        """The segment after its claim: load, train, decide, finish."""
        study = trial.study
        sched = self.scheduler
        state = self.init(trial)
        start = 0
        path = self.checkpoint_path(study, chain)
        if parent is not None and os.path.exists(path):
            saved = load_state(path, {"state": state,
                                      "step": np.asarray(0, np.int64)})
            state, start = saved["state"], int(saved["step"])
            have = trial.user_attrs.get(SAVED, 0)
            if start > have:   # a crashed parent saved after its claim
                source = study._storage.get_trial(
                    study._storage.get_trial_id_from_study_id_trial_number(
                        study._study_id, parent))
                with self._decision(study):
                    for e, v in sorted(source.intermediate_values.items()):
                        if have < e <= start:
                            trial.report(v, e)
        trial.set_user_attr(START, start)
        trial.set_user_attr(SAVED, start)
        pending = path + ".pending"
        if os.path.exists(pending):     # left by a worker killed before
            os.remove(pending)          # it reached its decision section
        if parent is not None and start in sched.rung_levels and \
                trial.user_attrs.get(REASON) == "retry":
            # The crashed parent may not have decided at this rung (its
            # checkpoint at ``start`` exists: it was just loaded).
            with self._decision(study):
                paused = self._at_rung(trial, chain, state, start,
                                       saved=True)
            if paused:
                raise optuna.TrialPruned(f"paused at {start}")
        value = math.nan
        for e in range(start + 1, sched.max_resource + 1):
            state, value = self.step(trial, state, e)
            value = float(value)
            rung = e in sched.rung_levels
            if rung and self.serialize:
                # Written before the lock, put in place (a rename) after
                # the report inside it: a checkpoint never runs ahead of
                # the reports, and one that pauses is claimable at once.
                save_state(pending, {"state": state,
                                     "step": np.asarray(e, np.int64)})
            paused, max_resource = False, None
            with self._decision(study):
                trial.report(value, e)
                if rung and self.serialize:
                    os.replace(pending, path)
                    trial.set_user_attr(SAVED, e)
                if self.on_report is not None or sched.kind == "pasha":
                    chains, winners = _snapshot(study)
                    epsilon = sched._new_epsilon(chains, winners, e)
                    if epsilon is not None:
                        trial.set_user_attr(EPSILON, list(epsilon))
                    recorded, top = sched._top(
                        study, chains, winners,
                        None if epsilon is None else epsilon[1])
                    if top > recorded:
                        trial.set_user_attr(TOP, top)
                    max_resource = sched.max_resource_for(top)
                if rung:
                    paused = self._at_rung(trial, chain, state, e,
                                           saved=self.serialize)
            if self.on_report is not None:
                self.on_report(trial, e, value, max_resource)
            if paused:
                raise optuna.TrialPruned(f"paused at {e}")
            if e == sched.max_resource:
                break
            if not rung and self.checkpoint_every and \
                    e % self.checkpoint_every == 0:
                self._save(trial, chain, state, e)
        with self._decision(study):
            trial.set_user_attr(STATUS, "complete")
            self._reap(study, own=trial._trial_id)
            chains, winners = _snapshot(study)
            # The worker is free: promote as after a pause.
            top = sched._top(study, chains, winners)[1]
            best = sched._promote(study, chains,
                                  sched.max_resource_for(top))
            if best is not None:
                self._claim(study, winners, best.tip, "promoted",
                            best.curve)
            self._service(study, chains, winners)
        return value

    def _at_rung(self, trial, chain: int, state: PyTree, e: int,
                 saved: bool = False) -> bool:
        """Decides at rung ``e`` (inside a decision section); True: the
        segment pauses (checkpointed, marked and the promoted chain
        enqueued). ``saved``: its checkpoint at ``e`` is written already."""
        study = trial.study
        sched = self.scheduler
        self._reap(study, own=trial._trial_id)
        chains, winners = _snapshot(study)
        top = sched._top(study, chains, winners)[1]
        best = sched._promote(study, chains, sched.max_resource_for(top),
                              pausing=chain)
        if best is not None and best.number == chain:
            return False
        if not saved:
            self._save(trial, chain, state, e)
        trial.set_user_attr(STATUS, "paused")
        if best is not None:
            self._claim(study, winners, best.tip, "promoted", best.curve)
        self._service(study, chains, winners)
        return True
