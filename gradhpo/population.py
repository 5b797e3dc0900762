r"""Hypergradient population search: many configurations in one program.

A population of :math:`N` members, each a complete bilevel run of the same
optimizer (parameters :math:`w_i`, hyperparameters :math:`\lambda_i`, both
optimizer states) started from its own hyperparameters, trains in one
jitted, vmapped step: every member takes its inner step *and* its
hypergradient step on :math:`\lambda_i` at once, on the same batches. At
*rung* boundaries (after :math:`r_1 < r_2 < \dots` steps) the members are
scored, :math:`s_i = \mathrm{score}(w_i, \lambda_i)` (lower is better), and
compared:

* ``mode="halving"`` (successive halving with hypergradient members): the
  :math:`\max(1, \lfloor n/\eta\rfloor)` best of the :math:`n` live members
  go on, the others stop. With :math:`N = \eta^k` members and :math:`k`
  rungs, one survivor trains to the end.
* ``mode="pbt"`` (population-based training with hypergradient steps):
  the population keeps its size. The :math:`k = \min(\lfloor n/2\rfloor,
  \max(1, \lfloor f n\rfloor))` worst members (``exploit_fraction``
  :math:`f`) are overwritten by copies of the :math:`k` best, the
  :math:`j`-th worst by the :math:`j`-th best (*exploit*: parameters, both
  optimizer states, step, metadata and hyperparameters are copied), and
  each copied floating hyperparameter coordinate is then moved
  (*explore*) by an independent random sign :math:`u = \pm 1`:

  .. math::

     \lambda \leftarrow \lambda\,(1 + \sigma u)
     \quad(\texttt{"multiply"}),\qquad
     \lambda \leftarrow \lambda + \sigma u \quad(\texttt{"add"}),

  with :math:`\sigma` = ``perturb_scale`` (the classic PBT factors 0.8 and
  1.2 are ``"multiply"`` with 0.2; use ``"add"`` for hyperparameters kept
  in log or logit form, where it multiplies the value by
  :math:`e^{\pm\sigma}`).

After the last step, the best of the live members (by one more scoring,
unless a single one is left) is returned.

**Compilation.** Halving *shrinks* the stacked state (the survivors are
gathered into smaller arrays) instead of masking dead members, so the
compute of a stage is proportional to its live members; the price is one
compilation of the step (and of the scoring) per distinct population size,
that is at most :math:`\lceil\log_\eta N\rceil + 1` of each. PBT keeps the
size, so one of each. The compiled functions belong to the search and
are freed with it (a cache keyed by the optimizer would keep every
optimizer, and what its losses close over, alive): build one search and
reuse it rather than a new one per run.

**Cost.** The population's count, :attr:`PopulationState.grad_evals`, adds
after every step what the live members' ``metadata["grad_evals"]`` grew by
(:mod:`gradhpo.utils.cost`); members dropped at a rung or overwritten by
PBT keep what they spent in it, and copies add nothing. It counts
gradients only: the scoring at rungs is forward-only, and is reported in
the history (one score per live member) for callers who charge it.
"""

import dataclasses
import functools
import numbers
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from gradhpo.core.state import BilevelState, float_dtype
from gradhpo.utils import validation as val
from gradhpo.utils.parallel import init_population
from gradhpo.utils.types import DataBatch, PyTree

MODES = ("halving", "pbt")
PERTURBATIONS = ("multiply", "add")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PopulationState:
    r"""The live members of a population search, as one pytree.

    Attributes:
      members: a :class:`~gradhpo.BilevelState` whose every leaf has a
        leading axis of length :math:`n`, the number of live members.
      ids: ``int32[n]``, each live member's index in the initial population
        (its slot, in PBT mode).
      grad_evals: the gradient evaluations the whole population has spent
        so far (live and dropped members), a scalar.
      key: the PRNG key of PBT's perturbations.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import gradhpo as gh
      >>> loss = lambda w, hp, b: jnp.sum((w - b) ** 2) + hp * jnp.sum(w**2)
      >>> opt = gh.T1T2(loss, loss, optax.sgd(0.1), optax.adam(0.01))
      >>> search = gh.PopulationSearch(opt, size=3, rung_steps=2)
      >>> pop = search.init(jnp.zeros(2), [0.1, 0.2, 0.3])
      >>> pop.size, pop.ids.tolist(), pop.members.hyperparams.shape
      (3, [0, 1, 2], (3,))
      >>> print(f"{float(pop.member(1).hyperparams):.2f}")
      0.20
    """

    members: BilevelState
    ids: jax.Array
    grad_evals: jax.Array
    key: jax.Array

    @property
    def size(self) -> int:
        """The number of live members."""
        return int(self.ids.shape[0])

    def member(self, index: int) -> BilevelState:
        """The state of the live member at position ``index``."""
        return jax.tree.map(lambda x: x[index], self.members)

    def replace(self, **fields: Any) -> "PopulationState":
        """A copy with the given fields replaced."""
        return dataclasses.replace(self, **fields)


class Rung(NamedTuple):
    """One selection of a population search (a row of its history).

    Attributes:
      step: the steps every live member had taken.
      ids: the ids of the members scored (in their order).
      scores: their scores (lower is better), a NumPy array.
      hyperparams: their hyperparameters when scored (stacked, NumPy).
      survivors: the ids live after the selection, in their new order.
      parents: for each member live after the selection, the id whose
        state it now holds (PBT's copies; equal to ``survivors`` for
        halving).
      grad_evals: the population's count at this point.
      final: whether this is the pick of the best member after the last
        step (no one is dropped or copied).
    """
    step: int
    ids: np.ndarray
    scores: np.ndarray
    hyperparams: PyTree
    survivors: np.ndarray
    parents: np.ndarray
    grad_evals: float
    final: bool = False


class PopulationResult(NamedTuple):
    """What :meth:`PopulationSearch.run` returns.

    Attributes:
      best: the best member's :class:`~gradhpo.BilevelState` (unstacked).
      best_id: its index in the initial population.
      history: one :class:`~gradhpo.population.Rung` per selection (and
        one for the final pick when several members were live).
      grad_evals: the whole population's gradient evaluations.
      population: the final :class:`PopulationState`.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import gradhpo as gh
      >>> loss = lambda w, hp, b: jnp.sum((w - b) ** 2) + hp * jnp.sum(w**2)
      >>> opt = gh.T1T2(loss, loss, optax.sgd(0.1), optax.adam(0.01))
      >>> search = gh.PopulationSearch(opt, size=3, rung_steps=1)
      >>> b = jnp.ones(2)
      >>> result = search.run(jnp.zeros(2), [0.5, 0.0, 1.0], [(b, b)] * 2,
      ...                     num_steps=2, score_batch=b)
      >>> result.best_id, [r.survivors.tolist() for r in result.history]
      (1, [[1]])
    """
    best: BilevelState
    best_id: int
    history: list
    grad_evals: float
    population: PopulationState


# -- compiled pieces ----------------------------------------------------------

# ``_population_step`` and ``_population_scores`` are jitted per search
# (in ``PopulationSearch.__init__``), not here with the optimizer as a
# static argument: jax.jit's cache would keep every optimizer ever used,
# with everything its losses close over, alive after the user drops it.

def _population_step(optimizer, pop: PopulationState, train_batch,
                     val_batch) -> PopulationState:
    members = jax.vmap(optimizer.step, in_axes=(0, None, None))(
        pop.members, train_batch, val_batch)
    spent = jnp.sum(members.metadata["grad_evals"]
                    - pop.members.metadata["grad_evals"])
    return pop.replace(members=members, grad_evals=(
        pop.grad_evals + spent).astype(pop.grad_evals.dtype))


def _population_scores(optimizer, score_fn, members: BilevelState,
                       batch) -> jax.Array:
    def by_val_loss(params, hyperparams):
        return optimizer.val_loss(params, hyperparams, batch)
    fn = by_val_loss if score_fn is None else score_fn
    return jax.vmap(fn)(members.params, members.hyperparams)


def _ranked(scores: jax.Array) -> jax.Array:
    """Positions sorted best first (NaN last; ties by position)."""
    return jnp.argsort(jnp.where(jnp.isnan(scores), jnp.inf, scores),
                       stable=True)


@functools.partial(jax.jit, static_argnums=2)
def _halve(pop: PopulationState, scores: jax.Array, keep: int):
    order = _ranked(scores)[:keep]
    members = jax.tree.map(lambda x: x[order], pop.members)
    return pop.replace(members=members, ids=pop.ids[order]), order


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _exploit_explore(pop: PopulationState, scores: jax.Array, k: int,
                     perturbation: str, scale: float):
    n = scores.shape[0]
    order = _ranked(scores)
    worst = order[n - k:][::-1]             # the j-th worst ...
    source = jnp.arange(n).at[worst].set(order[:k])   # ... <- j-th best
    replaced = jnp.zeros(n, bool).at[worst].set(True)
    key, sub = jax.random.split(pop.key)
    members = jax.tree.map(lambda x: x[source], pop.members)
    leaves, treedef = jax.tree.flatten(members.hyperparams)
    keys = jax.random.split(sub, max(len(leaves), 1))
    moved = []
    for leaf, k_leaf in zip(leaves, keys):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            moved.append(leaf)
            continue
        u = jax.random.rademacher(k_leaf, leaf.shape, leaf.dtype)
        new = leaf * (1 + scale * u) if perturbation == "multiply" \
            else leaf + scale * u
        mask = replaced.reshape((n,) + (1,) * (leaf.ndim - 1))
        moved.append(jnp.where(mask, new, leaf))
    members = members.replace(hyperparams=treedef.unflatten(moved))
    return pop.replace(members=members, key=key), source


# -- the search ---------------------------------------------------------------

class PopulationSearch:
    r"""Successive halving or PBT over members that tune by hypergradient.

    Members train in one jitted, vmapped step on shared batches; at each
    rung they are scored (lower is better) and halved (the best
    :math:`\max(1, \lfloor n/\eta\rfloor)` go on) or, in PBT mode, the
    worst ``exploit_fraction`` are overwritten by copies of the best with
    hyperparameters moved to :math:`\lambda(1 \pm \sigma)` or
    :math:`\lambda \pm \sigma`. The module :mod:`gradhpo.population` and
    the tutorial :doc:`/tutorials/population` give the details, the
    compilation (one per population size) and the cost accounting.

    Args:
      optimizer: any :class:`~gradhpo.BilevelOptimizer`; every member is a
        run of it.
      size: :math:`N`, the number of members (an int ``>= 1``).
      rung_steps: where the rungs are, in steps: an int :math:`r` (a rung
        every :math:`r` steps) or an increasing sequence of step counts
        (e.g. ``(S // 9, S // 3)`` for :math:`N = 9`, :math:`\eta = 3`);
        rungs at or after the last step are ignored.
      reduction_factor: :math:`\eta` of successive halving (int ``>= 2``).
      mode: ``"halving"`` or ``"pbt"``.
      score_fn: ``score_fn(params, hyperparams) -> scalar``, lower is
        better (e.g. a validation loss or minus an accuracy), vmapped over
        the members; ``None`` scores by the optimizer's ``val_loss`` on the
        ``score_batch`` given to :meth:`scores` or :meth:`run`.
      exploit_fraction: :math:`f` of PBT, in ``(0, 0.5]``.
      perturbation: PBT's explore rule, ``"multiply"`` or ``"add"``.
      perturb_scale: :math:`\sigma` of PBT's explore rule, a real ``>= 0``.

    Example:
      Nine L2 penalties (log scale), halved twice with :math:`\eta = 3`;
      the weakest penalty fits the data best and survives:

      >>> import jax.numpy as jnp, optax
      >>> import gradhpo as gh
      >>> def train_loss(w, hp, b):
      ...     return jnp.mean((w - b) ** 2) + jnp.exp(hp) * jnp.sum(w ** 2)
      >>> def val_loss(w, hp, b):
      ...     return jnp.mean((w - b) ** 2)
      >>> opt = gh.T1T2(train_loss, val_loss, optax.sgd(0.1),
      ...               optax.adam(0.05))
      >>> search = gh.PopulationSearch(opt, size=9, rung_steps=(5, 15))
      >>> b = jnp.ones(4)
      >>> starts = [jnp.array(float(h)) for h in range(-4, 5)]
      >>> result = search.run(jnp.zeros(4), starts, lambda t: (b, b), 30,
      ...                     score_batch=b)
      >>> [len(r.ids) for r in result.history], result.best_id
      ([9, 3], 0)
      >>> float(result.grad_evals)    # (9 * 5 + 3 * 10 + 15) steps * 4 G
      360.0
    """

    def __init__(self, optimizer, *, size: int,
                 rung_steps, reduction_factor: int = 3,
                 mode: str = "halving",
                 score_fn: Optional[Callable] = None,
                 exploit_fraction: float = 0.25,
                 perturbation: str = "multiply",
                 perturb_scale: float = 0.2) -> None:
        if not hasattr(optimizer, "init") or not hasattr(optimizer, "step"):
            raise TypeError(
                "optimizer must be a gradhpo.BilevelOptimizer (e.g. "
                f"gh.T1T2(...)), got {type(optimizer).__name__}.")
        self.optimizer = optimizer
        self.size = val.check_int(size, "size", minimum=1)
        self.rung_steps = _check_rungs(rung_steps)
        self.reduction_factor = val.check_int(
            reduction_factor, "reduction_factor", minimum=2)
        val.check_choice(mode, "mode", MODES)
        self.mode = mode
        if score_fn is not None:
            val.check_callable(score_fn, "score_fn")
        self.score_fn = score_fn
        self.exploit_fraction = val.check_real(
            exploit_fraction, "exploit_fraction", low=0.0, high=0.5,
            low_open=True)
        val.check_choice(perturbation, "perturbation", PERTURBATIONS)
        self.perturbation = perturbation
        self.perturb_scale = val.check_real(perturb_scale, "perturb_scale",
                                            low=0.0)
        # compiled with the search and freed with it (one compilation per
        # population size)
        self._step = jax.jit(functools.partial(_population_step, optimizer))
        self._scores = jax.jit(functools.partial(_population_scores,
                                                 optimizer, score_fn))

    def __repr__(self) -> str:
        return (f"PopulationSearch({self.optimizer!r}, size={self.size}, "
                f"rung_steps={self.rung_steps!r}, "
                f"reduction_factor={self.reduction_factor}, "
                f"mode={self.mode!r})")

    def rungs(self, num_steps: int) -> Tuple[int, ...]:
        """The rung boundaries (in steps) of a ``num_steps``-step run."""
        if isinstance(self.rung_steps, int):
            r = self.rung_steps
            return tuple(range(r, num_steps, r))
        return tuple(s for s in self.rung_steps if s < num_steps)

    def init(self, params: PyTree, hyperparams, *,
             key: Optional[jax.Array] = None) -> PopulationState:
        """The initial population.

        Args:
          params: the initial parameters, shared by every member.
          hyperparams: a list or tuple of ``size`` hyperparameter pytrees
            of one structure (the members' starting points), or a callable
            ``key -> hyperparams`` that samples one, called ``size`` times.
          key: a PRNG key, split for the members' ``init``, the sampler and
            PBT (``None``: ``jax.random.PRNGKey(0)``).
        """
        key = val.check_key(key)
        k_members, k_sample, k_pop = jax.random.split(key, 3)
        if callable(hyperparams):
            hyperparams = [hyperparams(k) for k in
                           jax.random.split(k_sample, self.size)]
        if not isinstance(hyperparams, (list, tuple)):
            raise TypeError(
                "hyperparams must be a list or tuple of size hyperparameter "
                "pytrees (one per member) or a callable key -> "
                f"hyperparams, got {type(hyperparams).__name__}.")
        if len(hyperparams) != self.size:
            raise ValueError(
                f"hyperparams must hold size={self.size} starting points, "
                f"got {len(hyperparams)}.")
        members = init_population(self.optimizer, params, list(hyperparams),
                                  key=k_members)
        return PopulationState(
            members=members, ids=jnp.arange(self.size, dtype=jnp.int32),
            grad_evals=jnp.zeros((), float_dtype()), key=k_pop)

    def step(self, population: PopulationState, train_batch: DataBatch,
             val_batch: DataBatch) -> PopulationState:
        """One step of every live member on the same batches (one jitted,
        vmapped call, compiled once per population size)."""
        _check_population(population)
        return self._step(population, train_batch, val_batch)

    def scores(self, population: PopulationState,
               score_batch: Optional[DataBatch] = None) -> jax.Array:
        """The live members' scores (lower is better), a ``(n,)`` array:
        ``score_fn``, or the optimizer's ``val_loss`` on ``score_batch``."""
        _check_population(population)
        if self.score_fn is None and score_batch is None:
            raise ValueError(
                "score_batch must be given (a validation batch) when the "
                "search has no score_fn.")
        out = self._scores(
            population.members,
            None if self.score_fn is not None else score_batch)
        if out.shape != (population.size,):
            raise ValueError(
                "score_fn must return a scalar per member, got an output "
                f"of shape {out.shape[1:]} per member.")
        return out

    def select(self, population: PopulationState, scores
               ) -> Tuple[PopulationState, Rung]:
        """Halving or exploit-and-explore at a rung, by ``scores`` (one per
        live member, lower is better; NaN counts as the worst; ties go
        to the earlier member).

        Returns:
          The new population and the :class:`~gradhpo.population.Rung`
          that records the selection.
        """
        _check_population(population)
        scores = jnp.asarray(scores)
        n = population.size
        if scores.shape != (n,):
            raise ValueError(f"scores must have shape ({n},) (one per live "
                             f"member), got {scores.shape}.")
        ids = np.asarray(population.ids)
        if self.mode == "halving":
            keep = max(1, n // self.reduction_factor)
            new, source = _halve(population, scores, keep)
        else:
            k = min(n // 2, max(1, int(self.exploit_fraction * n)))
            if k == 0:
                new, source = population, jnp.arange(n)
            else:
                new, source = _exploit_explore(
                    population, scores, k, self.perturbation,
                    self.perturb_scale)
        return new, Rung(
            step=int(population.members.step[0]), ids=ids,
            scores=np.asarray(scores),
            hyperparams=jax.tree.map(np.asarray,
                                     population.members.hyperparams),
            survivors=np.asarray(new.ids), parents=ids[np.asarray(source)],
            grad_evals=float(population.grad_evals))

    def run(self, params: PyTree, hyperparams, batches, num_steps: int, *,
            score_batch: Optional[DataBatch] = None,
            key: Optional[jax.Array] = None) -> PopulationResult:
        """The whole search: ``num_steps`` steps with selections at rungs.

        Args:
          params, hyperparams, key: as for :meth:`init`.
          batches: the data of each step, shared by the members: an
            iterable of ``(train_batch, val_batch)`` pairs, or a callable
            ``step -> (train_batch, val_batch)``.
          num_steps: the steps every surviving member takes (int ``>= 1``).
          score_batch: the validation batch scored at rungs when the search
            has no ``score_fn`` (not needed for ``size=1``).

        Returns:
          A :class:`PopulationResult`. Selections happen only while
          several members are live.
        """
        num_steps = val.check_int(num_steps, "num_steps", minimum=1)
        if self.score_fn is None and score_batch is None and self.size > 1:
            raise ValueError(
                "score_batch must be given (a validation batch) when the "
                "search has no score_fn.")
        pop = self.init(params, hyperparams, key=key)
        source = batch_source(batches, num_steps)
        rungs = set(self.rungs(num_steps))
        history = []
        for t in range(num_steps):
            if t in rungs and pop.size > 1:
                pop, rung = self.select(pop, self.scores(pop, score_batch))
                history.append(rung)
            pop = self.step(pop, *source(t))
        best = 0
        if pop.size > 1:
            scores = self.scores(pop, score_batch)
            best = int(_ranked(scores)[0])
            ids = np.asarray(pop.ids)
            history.append(Rung(
                step=num_steps, ids=ids, scores=np.asarray(scores),
                hyperparams=jax.tree.map(np.asarray,
                                         pop.members.hyperparams),
                survivors=ids[best:best + 1], parents=ids[best:best + 1],
                grad_evals=float(pop.grad_evals), final=True))
        return PopulationResult(
            best=pop.member(best), best_id=int(pop.ids[best]),
            history=history, grad_evals=float(pop.grad_evals),
            population=pop)


def batch_source(batches, num_steps: int) -> Callable[[int], Any]:
    """``batches`` of :meth:`PopulationSearch.run` as a callable ``step ->
    (train_batch, val_batch)``: a callable as it is, an iterable read in
    order (a ``ValueError`` if it runs out before ``num_steps``)."""
    if callable(batches):
        return batches
    it = iter(batches)

    def source(t: int):
        try:
            return next(it)
        except StopIteration:
            raise ValueError(f"batches ran out after {t} steps; num_steps "
                             f"is {num_steps}.") from None
    return source


def _check_rungs(rung_steps) -> Any:
    if isinstance(rung_steps, numbers.Integral) and not isinstance(
            rung_steps, bool):
        return val.check_int(rung_steps, "rung_steps", minimum=1)
    if not isinstance(rung_steps, (list, tuple)) or not rung_steps:
        raise TypeError(
            "rung_steps must be an int (a rung every rung_steps steps) or a "
            f"non-empty list or tuple of step counts, got {rung_steps!r}.")
    out = tuple(val.check_int(r, "rung_steps", minimum=1)
                for r in rung_steps)
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"rung_steps must be strictly increasing, got "
                         f"{list(out)}.")
    return out


def _check_population(population: Any) -> None:
    if not isinstance(population, PopulationState):
        raise TypeError(
            "population must be a gradhpo.PopulationState (from "
            f"PopulationSearch.init), got {type(population).__name__}.")


__all__ = ["PopulationResult", "PopulationSearch", "PopulationState", "Rung"]
