r"""The methods, each spending a budget of counted gradient evaluations.

Every method returns one model trained for :math:`S` steps (except
``default_full_budget``, which trains for the whole budget), chosen on the
validation set only; the test set is evaluated once, for the report.

Cost unit :math:`G`: one forward and backward pass on one training batch
of :math:`m` examples (``gradhpo.utils.cost``). The same rules for every
method:

* gradhpo steps: what the library counts, ``state.metadata["grad_evals"]``;
* a plain training step (baselines, Optuna trials, retrains): :math:`1\,G`;
* a forward-only evaluation of :math:`n` examples: :math:`n/(3m)\,G` (a
  forward pass is about a third of a forward and backward pass).

Budget: ``budget`` :math:`B` buys :math:`B\,(S + e)` G, where :math:`e`
is one evaluation of the validation set, i.e. :math:`B` plain training runs
of :math:`S` steps each scored on the validation set. A method starts a new
model (round or trial) only while the rest of the budget pays for all of
it; the first model is always trained (only ``tpe_sh`` can then exceed the
budget, by its intermediate evaluations).

How the gradhpo methods spend a budget (``run_gradhpo``): a sequence of
*rounds*, each an :math:`S`-step training from the seed's initial weights
that starts from the hyperparameters tuned by the previous round (the
first from the task's default). Within a round, hyper-steps are taken
while the budget can still pay for them and for the rest of the round as
plain steps; the rest of the round then trains with the hyperparameters
fixed (charged at 1 G per step), continuing the inner optimizer's state.
So at :math:`B = 1` no hyper-step fits (the method equals ``default``); at
larger :math:`B` the first rounds tune throughout and the last one tunes
partly. The round with the best validation accuracy is tested. Each task
lists the gradhpo methods that apply to it (``Problem.gh_methods``):
``Implicit`` differentiates through the fixed point of the training loss,
so it does not apply to the optimizer's learning rate and momentum, and
``ForwardMode`` carries one tangent per hyperparameter, so it is used for
small hyperparameter counts only.

The Optuna methods (``run_optuna``) sample the task's full search space
(``Problem.suggest``: per-layer means one value per layer) and train each
trial for :math:`S` plain steps; ``tpe_sh`` reports the validation
accuracy on a quarter of the validation set after each quarter of training
and is pruned by successive halving. The best complete trial by validation
accuracy is tested.
"""

import dataclasses
import functools
import time
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optuna

import gradhpo as gh
from hpo import tasks

#: Methods trained only once (budget 1): references, not searches.
REFERENCES = ("default", "oracle")
OPTUNA = ("random", "tpe", "tpe_sh")
#: Every gradhpo method of some task, in a stable order.
GRADHPO = tuple(dict.fromkeys(
    m for p in tasks.PROBLEMS.values() for m in p.gh_methods))
#: gradhpo's hypergradient population search (``run_population``), whose
#: members run :data:`POPULATION_MEMBER`.
POPULATION = ("gh_population",)
POPULATION_MEMBER = "gh_t1t2"
METHODS = (REFERENCES + ("default_full_budget",) + GRADHPO + POPULATION
           + OPTUNA)
#: Variants kept for their published rows (run them with ``--methods``):
#: ForwardMode updating at every step, which failed with the shared outer
#: step (docs/hpo_benchmark.rst).
ABLATIONS = ("gh_forward_mode_every_step",)
#: What ``run.py`` runs when ``--methods`` is not given.
DEFAULT_METHODS = tuple(m for m in METHODS if m not in ABLATIONS)


def methods_of(problem: tasks.Problem) -> List[str]:
    """The methods that apply to a task, in :data:`METHODS` order."""
    return [m for m in METHODS
            if (m != "oracle" or problem.oracle is not None)
            and (m not in GRADHPO or m in problem.gh_methods)
            and (m not in POPULATION
                 or POPULATION_MEMBER in problem.gh_methods)]


@dataclasses.dataclass(frozen=True)
class Config:
    """The training setup shared by every method and task.

    Attributes:
      steps: :math:`S`, the training length of a tested model.
      batch_size: :math:`m`, training (and hyper-step validation) batch.
      greedy_horizon: inner steps per ``gh.Greedy`` call.
      hyperdistill_gamma: ``gh.HyperDistill``'s gamma (its theta stays
        1: ``estimate_theta`` is not run, so that nothing outside the
        counted budget is spent).
      implicit_interval, implicit_terms: ``gh.Implicit``'s
        ``hyper_interval`` and CG iterations.
      forward_interval: ``gh.ForwardMode``'s ``hyper_interval`` (method
        ``gh_forward_mode``; RTHO's hyper-batch of Franceschi et al.
        2017): one outer update per this many inner steps, the tangents
        advanced at every step. ``gh_forward_mode_every_step`` updates at
        every step.
      tpe_startup: TPE's random start-up trials.
      sh_reports: validation reports per ``tpe_sh`` trial.
    """
    steps: int = 500
    batch_size: int = 100
    greedy_horizon: int = 5
    hyperdistill_gamma: float = 0.99
    implicit_interval: int = 10
    implicit_terms: int = 5
    forward_interval: int = 10
    tpe_startup: int = 3
    sh_reports: int = 4


def eval_cost(n: int, cfg: Config) -> float:
    """G charged for a forward-only evaluation of ``n`` examples."""
    return n / (3.0 * cfg.batch_size)


def budget_grad_evals(budget: int, task: tasks.Task, cfg: Config) -> float:
    """What ``budget`` buys: ``budget`` plain S-step runs with their
    validation evaluation."""
    return budget * (cfg.steps + eval_cost(task.n_val, cfg))


def batch_order(n: int, m: int, steps: int, rng: np.random.Generator
                ) -> np.ndarray:
    """``(steps, m)`` example indices: epochs of seeded permutations."""
    m = min(m, n)
    per_epoch = n // m
    epochs = -(-steps // per_epoch) + 1
    rows = [rng.permutation(n)[:per_epoch * m].reshape(per_epoch, m)
            for _ in range(epochs)]
    return np.concatenate(rows)[:steps].astype(np.int32)


def _train_impl(problem, params, opt_state, hyperparams, x, y, order,
                start):
    tx = problem.optimizer(hyperparams)

    def body(carry, inputs):
        p, s = carry
        idx, step = inputs
        g = jax.grad(problem.train_loss)(
            p, hyperparams,
            (x[idx], y[idx], idx, jnp.full(idx.shape, step, jnp.int32)))
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None
    steps = start + jnp.arange(order.shape[0], dtype=jnp.int32)
    return jax.lax.scan(body, (params, opt_state), (order, steps))[0]


_train = jax.jit(_train_impl, static_argnums=0)
_opt_init = jax.jit(lambda problem, params, hp:
                    problem.optimizer(hp).init(params), static_argnums=0)


@jax.jit
def _gather(x, y, idx, step):
    """A batch ``(x, y, index, step)``; the step number is repeated per
    example, so that every leaf has the batch axis (HyperDistill mixes
    batches row by row)."""
    return (x[idx], y[idx], idx,
            jnp.broadcast_to(step[..., None], idx.shape).astype(jnp.int32))


class Ledger:
    """Counts what a method spends, by kind (all in G)."""

    def __init__(self, problem: tasks.Problem, task: tasks.Task,
                 cfg: Config, budget: int) -> None:
        self.problem, self.task, self.cfg = problem, task, cfg
        self.limit = budget_grad_evals(budget, task, cfg)
        self.library = 0.0      # gradhpo's own metadata counts
        self.plain_steps = 0
        self.evaluated = 0      # examples evaluated forward-only
        self.hyper_steps = 0
        self.models = 0

    @property
    def spent(self) -> float:
        return (self.library + self.plain_steps
                + eval_cost(self.evaluated, self.cfg))

    def left(self) -> float:
        """The budget left (plus a rounding tolerance of 1e-6 G)."""
        return self.limit - self.spent + 1e-6

    def train(self, params, opt_state, hyperparams, order, start=0):
        """Plain steps of the task's inner optimizer at fixed
        ``hyperparams`` (1 G each); ``opt_state=None`` starts afresh;
        ``start`` is the number of the first step within its run."""
        if opt_state is None:
            opt_state = _opt_init(self.problem, params, hyperparams)
        self.plain_steps += len(order)
        return _train(self.problem, params, opt_state, hyperparams,
                      self.task.x_train, self.task.y_train,
                      jnp.asarray(order), jnp.int32(start))

    def validate(self, params, n: Optional[int] = None) -> float:
        """Validation accuracy on the first ``n`` validation examples."""
        n = self.task.n_val if n is None else n
        self.evaluated += n
        acc, _ = tasks.evaluate(self.problem, params, self.task.x_val[:n],
                                self.task.y_val[:n])
        return float(acc)

    def result(self, params, val_accuracy: float, **extra) -> Dict[str, Any]:
        """The row fields of the tested model (test set used only here)."""
        acc, loss = tasks.evaluate(self.problem, params, self.task.x_test,
                                   self.task.y_test)
        return dict(test_accuracy=float(acc), test_loss=float(loss),
                    val_accuracy=float(val_accuracy),
                    grad_evals=float(self.spent),
                    budget_grad_evals=float(self.limit),
                    library_grad_evals=float(self.library),
                    plain_steps=int(self.plain_steps),
                    eval_grad_evals=float(eval_cost(self.evaluated,
                                                    self.cfg)),
                    hyper_steps=int(self.hyper_steps),
                    models_trained=int(self.models), **extra)


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


# -- fixed hyperparameters ---------------------------------------------------

def run_fixed(method: str, problem: tasks.Problem, task: tasks.Task,
              cfg: Config, budget: int, seed: int) -> Dict[str, Any]:
    """``default`` (the untuned values), ``oracle`` (the task's reference
    that knows the truth), ``default_full_budget`` (the default trained
    for as many steps as the budget pays)."""
    led = Ledger(problem, task, cfg, budget)
    hp = (problem.oracle(task) if method == "oracle"
          else problem.default(task))
    steps = cfg.steps
    if method == "default_full_budget":
        steps = int(led.limit - eval_cost(task.n_val, cfg))
    order = batch_order(task.n_train, cfg.batch_size, steps, _rng(seed, 1, 0))
    params, _ = led.train(problem.init_params(task), None, hp, order)
    led.models = 1
    return led.result(params, led.validate(params), train_steps=steps)


# -- gradhpo ---------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def make_optimizer(method: str, problem: tasks.Problem, cfg: Config
                   ) -> gh.BilevelOptimizer:
    """The gradhpo optimizer of a method (the task's inner optimizer,
    Adam outside). Cached: one optimizer, so one compilation, per method,
    task and configuration, shared by every budget and seed."""
    if method not in problem.gh_methods:
        raise ValueError(f"method {method!r} does not apply to task "
                         f"{problem.name!r}; its gradhpo methods are "
                         f"{sorted(problem.gh_methods)}")
    algorithm, _ = problem.gh_methods[method]
    args = (problem.train_loss, problem.val_loss, problem.inner,
            optax.adam(problem.hyper_lr))
    if algorithm == "t1t2":
        return gh.T1T2(*args)
    if algorithm == "greedy":
        return gh.Greedy(*args, horizon=cfg.greedy_horizon, gamma=0.9)
    if algorithm == "forward_mode":
        return gh.ForwardMode(*args, hyper_interval=cfg.forward_interval)
    if algorithm == "forward_mode_every_step":
        return gh.ForwardMode(*args)
    if algorithm == "hyperdistill":
        return gh.HyperDistill(*args, gamma=cfg.hyperdistill_gamma)
    if algorithm == "implicit":
        return gh.Implicit(*args, solver="cg", terms=cfg.implicit_terms,
                           hyper_interval=cfg.implicit_interval)
    raise ValueError(f"unknown algorithm {algorithm!r}")


def block_shape(method: str, problem: tasks.Problem, cfg: Config):
    """(calls, model steps per call) of one accounting block: one call,
    but ``hyper_interval`` calls for Implicit and ForwardMode (one
    hyper-update each)."""
    algorithm, _ = problem.gh_methods[method]
    if algorithm == "greedy":
        return 1, cfg.greedy_horizon
    if algorithm == "implicit":
        return cfg.implicit_interval, 1
    if algorithm == "forward_mode":
        return cfg.forward_interval, 1
    return 1, 1


class _Batches:
    """The training and validation batches of one round."""

    def __init__(self, task, per_call, order, val_order):
        self.task, self.order, self.val_order = task, order, val_order
        self.per_call = per_call

    def call(self, start: int):
        t = self.task
        if self.per_call == 1:
            rows, steps = start, np.int32(start)
        else:
            rows = slice(start, start + self.per_call)
            steps = np.arange(start, start + self.per_call, dtype=np.int32)
        tr = _gather(t.x_train, t.y_train, jnp.asarray(self.order[rows]),
                     jnp.asarray(steps))
        vx, vy, _, _ = _gather(t.x_val, t.y_val,
                               jnp.asarray(self.val_order[rows]),
                               jnp.asarray(steps))
        return tr, (vx, vy)


def _init(opt, method, problem, task, hyperparams, batches, seed=0):
    """``opt.init`` at the seed's initial weights; HyperDistill also gets
    a training batch (the shapes of its distilled batch) and a key."""
    params = problem.init_params(task)
    if problem.gh_methods[method][0] == "hyperdistill":
        return opt.init(params, hyperparams, batch=batches.call(0)[0],
                        key=jax.random.PRNGKey(seed))
    return opt.init(params, hyperparams)


def _gh_start(method, problem, task):
    return problem.gh_init(task, problem.gh_methods[method][1])


def probe_block_cost(opt, method, problem, task, cfg) -> float:
    """What the library charges for one accounting block, read from the
    metadata of a scratch state (run once, not kept, not charged: the
    counts are fixed when the step is compiled)."""
    calls, per_call = block_shape(method, problem, cfg)
    order = batch_order(task.n_train, cfg.batch_size, calls * per_call,
                        _rng(0, 9))
    val_order = batch_order(task.n_val, cfg.batch_size, calls * per_call,
                            _rng(0, 10))
    batches = _Batches(task, per_call, order, val_order)
    state = _init(opt, method, problem, task, _gh_start(method, problem,
                                                        task), batches)
    for c in range(calls):
        state = opt.step(state, *batches.call(c * per_call))
    return float(state.metadata["grad_evals"])


def run_gradhpo(method: str, problem: tasks.Problem, task: tasks.Task,
                cfg: Config, budget: int, seed: int) -> Dict[str, Any]:
    """Rounds of online tuning (module docstring)."""
    opt = make_optimizer(method, problem, cfg)
    calls, per_call = block_shape(method, problem, cfg)
    block_steps = calls * per_call
    block_cost = probe_block_cost(opt, method, problem, task, cfg)
    e = eval_cost(task.n_val, cfg)
    led = Ledger(problem, task, cfg, budget)
    hp = _gh_start(method, problem, task)
    best = (-1.0, None, -1)
    rnd = 0
    while rnd == 0 or led.left() >= cfg.steps + e:
        order = batch_order(task.n_train, cfg.batch_size, cfg.steps,
                            _rng(seed, 1, rnd))
        val_order = batch_order(task.n_val, cfg.batch_size, cfg.steps,
                                _rng(seed, 2, rnd))
        batches = _Batches(task, per_call, order, val_order)
        state = _init(opt, method, problem, task, hp, batches, seed)
        done, planned = 0, 0.0
        while (done + block_steps <= cfg.steps
               and led.left() - planned >= block_cost
               + (cfg.steps - done - block_steps) + e):
            for c in range(calls):
                state = opt.step(state, *batches.call(done + c * per_call))
            done += block_steps
            planned += block_cost
        counted = float(state.metadata["grad_evals"])
        led.library += counted
        led.hyper_steps += done
        hp = state.hyperparams
        params = state.params
        if done < cfg.steps:
            params, _ = led.train(params, state.inner_opt_state, hp,
                                  order[done:], start=done)
        led.models += 1
        acc = led.validate(params)
        if acc > best[0]:
            best = (acc, params, rnd)
        rnd += 1
    extra = problem.diagnostics(task, hp) if problem.diagnostics else {}
    return led.result(
        best[1], best[0], best_round=best[2],
        block_grad_evals=block_cost, block_steps=block_steps, **extra)


# -- Optuna ----------------------------------------------------------------

def run_optuna(method: str, problem: tasks.Problem, task: tasks.Task,
               cfg: Config, budget: int, seed: int) -> Dict[str, Any]:
    """Black-box search over the task's space (module docstring)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if method == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=cfg.tpe_startup)
    pruned = method == "tpe_sh"
    pruner = (optuna.pruners.SuccessiveHalvingPruner(
        min_resource=1, reduction_factor=3) if pruned
        else optuna.pruners.NopPruner())
    study = optuna.create_study(direction="maximize", sampler=sampler,
                                pruner=pruner)
    led = Ledger(problem, task, cfg, budget)
    e = eval_cost(task.n_val, cfg)
    reports = cfg.sh_reports if pruned else 1
    sub = task.n_val // reports
    full = cfg.steps + e + (reports - 1) * eval_cost(sub, cfg)
    models = {}
    while led.models == 0 or led.left() >= full:
        trial = study.ask()
        hp = problem.suggest(trial, task)
        order = batch_order(task.n_train, cfg.batch_size, cfg.steps,
                            _rng(seed, 1, trial.number))
        params, opt_state = problem.init_params(task), None
        led.models += 1
        chunk = cfg.steps // reports
        state = optuna.trial.TrialState.COMPLETE
        for r in range(reports):
            stop = cfg.steps if r == reports - 1 else (r + 1) * chunk
            params, opt_state = led.train(params, opt_state, hp,
                                          order[r * chunk:stop],
                                          start=r * chunk)
            if r < reports - 1:
                trial.report(led.validate(params, sub), r)
                if trial.should_prune():
                    state = optuna.trial.TrialState.PRUNED
                    break
        if state == optuna.trial.TrialState.PRUNED:
            study.tell(trial, state=state)
            continue
        acc = led.validate(params)
        study.tell(trial, acc)
        models[trial.number] = params
    best = study.best_trial
    return led.result(models[best.number], best.value,
                      trials=len(study.trials),
                      pruned=sum(t.state == optuna.trial.TrialState.PRUNED
                                 for t in study.trials))


# -- gradhpo population search (gh_population) ------------------------------
#
# N members, each the task's gh_t1t2 run (T1T2 with the task's inner
# optimizer, Adam outside), train in one vmapped program
# (gh.PopulationSearch) and are halved with eta = 3 at rungs of S/9 and S/3
# steps by validation accuracy; the survivor trains to S steps on the same
# batches (the tested model is trained exactly S steps). Member 0 starts
# from the task's gradhpo start (the default); members 1..N-1 from draws of
# the task's own search space (``Problem.suggest``, Optuna's RandomSampler
# with the seed). Charged: every member's library count, every rung
# evaluation (the whole validation set per live member) and the survivor's
# plain steps and final evaluation. N is the largest (at most 9) whose
# cheapest schedule fits the budget: while several members are live they
# hyper-step throughout; the survivor then hyper-steps while the budget
# pays for it and for the rest of its S steps as plain ones, as in
# ``run_gradhpo``. At 1x no N >= 2 fits, the single member takes no
# hyper-step, and the method equals ``default``.

#: At most eta^2 members: one survivor after the two rungs.
POPULATION_SIZE = 9
POPULATION_ETA = 3


def population_rungs(cfg: Config):
    """The rungs, in steps: S/9 and S/3 (those in ``(0, S)``)."""
    return tuple(sorted({r for r in (cfg.steps // 9, cfg.steps // 3)
                         if 0 < r < cfg.steps}))


def population_cost(n: int, step_cost: float, e: float, rungs,
                    steps: int) -> float:
    """G of the cheapest schedule of ``n`` members (module section above):
    ``n == 1`` is one plain S-step run and its validation."""
    cost, live, done = 0.0, n, 0
    for r in rungs:
        if live == 1:
            break
        cost += live * ((r - done) * step_cost + e)
        live, done = max(1, live // POPULATION_ETA), r
    if live > 1:      # hyper-steps to S, each member validated at the end
        return cost + live * ((steps - done) * step_cost + e)
    return cost + (steps - done) + e


def population_starts(problem: tasks.Problem, task: tasks.Task, n: int,
                      seed: int) -> list:
    """The members' starting hyperparameters: the task's gradhpo start,
    then ``n - 1`` draws of ``problem.suggest`` (RandomSampler(seed)),
    broadcast to the start's shapes and dtypes."""
    start = _gh_start(POPULATION_MEMBER, problem, task)
    out = [start]
    if n > 1:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(
            sampler=optuna.samplers.RandomSampler(seed=seed))
        for _ in range(n - 1):
            hp = problem.suggest(study.ask(), task)
            out.append(jax.tree.map(
                lambda s, h: jnp.broadcast_to(jnp.asarray(h, s.dtype),
                                              s.shape), start, hp))
    return out


def _population_accuracy_impl(problem, params, x, y):
    return jax.vmap(lambda p: tasks.evaluate(problem, p, x, y)[0])(params)


_population_accuracy = jax.jit(_population_accuracy_impl, static_argnums=0)


def run_population(method: str, problem: tasks.Problem, task: tasks.Task,
                   cfg: Config, budget: int, seed: int) -> Dict[str, Any]:
    """Hypergradient successive halving (section comment above)."""
    opt = make_optimizer(POPULATION_MEMBER, problem, cfg)
    step_cost = probe_block_cost(opt, POPULATION_MEMBER, problem, task, cfg)
    e = eval_cost(task.n_val, cfg)
    led = Ledger(problem, task, cfg, budget)
    rungs = population_rungs(cfg)
    n = max(k for k in range(1, POPULATION_SIZE + 1) if k == 1
            or population_cost(k, step_cost, e, rungs, cfg.steps)
            <= led.left())
    starts = population_starts(problem, task, n, seed)
    order = batch_order(task.n_train, cfg.batch_size, cfg.steps,
                        _rng(seed, 1, 0))
    val_order = batch_order(task.n_val, cfg.batch_size, cfg.steps,
                            _rng(seed, 2, 0))
    batches = _Batches(task, 1, order, val_order)
    led.models = n
    done, sizes, survivor, acc, params = 0, [n], 0, None, None
    state = opt.init(problem.init_params(task), starts[0])
    if n > 1:
        search = gh.PopulationSearch(opt, size=n, rung_steps=rungs,
                                     reduction_factor=POPULATION_ETA)
        pop = search.init(problem.init_params(task), starts)
        for stop in rungs + (cfg.steps,):
            while done < stop:
                pop = search.step(pop, *batches.call(done))
                led.hyper_steps += pop.size
                done += 1
            scores = _population_accuracy(problem, pop.members.params,
                                          task.x_val, task.y_val)
            led.evaluated += task.n_val * pop.size
            if done == cfg.steps:      # several live at the end: the best
                best = int(np.argmax(np.asarray(scores)))
                state, survivor = pop.member(best), int(pop.ids[best])
                acc, params = float(scores[best]), state.params
                break
            pop, _ = search.select(pop, -scores)
            sizes.append(pop.size)
            if pop.size == 1:
                break
        led.library += float(pop.grad_evals)
        if acc is None:
            state, survivor = pop.member(0), int(pop.ids[0])
    if acc is None:
        counted = float(state.metadata["grad_evals"])
        planned = 0.0
        while (done < cfg.steps and led.left() - planned
               >= step_cost + (cfg.steps - done - 1) + e):
            state = opt.step(state, *batches.call(done))
            led.hyper_steps += 1
            done += 1
            planned += step_cost
        led.library += float(state.metadata["grad_evals"]) - counted
        params = state.params
        if done < cfg.steps:
            params, _ = led.train(params, state.inner_opt_state,
                                  state.hyperparams, order[done:],
                                  start=done)
        acc = led.validate(params)
    extra = (problem.diagnostics(task, state.hyperparams)
             if problem.diagnostics else {})
    return led.result(params, acc, population_size=n,
                      population_sizes=sizes, population_rungs=list(rungs),
                      survivor=survivor, block_grad_evals=step_cost,
                      **extra)


def run(method: str, task: tasks.Task, cfg: Config, budget: int,
        seed: int) -> Dict[str, Any]:
    """One row's measurements (plus ``seconds``) for a method on a task."""
    problem = tasks.PROBLEMS[task.name]
    if method not in methods_of(problem):
        raise ValueError(f"method {method!r} does not apply to task "
                         f"{task.name!r}; one of {methods_of(problem)}")
    start = time.perf_counter()
    if method in GRADHPO:
        out = run_gradhpo(method, problem, task, cfg, budget, seed)
    elif method in POPULATION:
        out = run_population(method, problem, task, cfg, budget, seed)
    elif method in OPTUNA:
        out = run_optuna(method, problem, task, cfg, budget, seed)
    else:
        out = run_fixed(method, problem, task, cfg, budget, seed)
    out["seconds"] = time.perf_counter() - start
    return out
