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
*rounds*, each an :math:`S`-step training from fresh parameters that
starts from the example weights tuned by the previous round. Within a
round, hyper-steps are taken while the budget can still pay for them and
for the rest of the round as plain steps; the rest of the round then
trains with the weights fixed (a retrain, charged at 1 G per step). So at
:math:`B = 1` no hyper-step fits (the method equals ``default``); at larger
:math:`B` the first rounds tune throughout and the last one tunes partly.
The round with the best validation accuracy is tested.

The Optuna methods (``run_optuna``) sample the same 5,000-dimensional (on
MNIST) space, one weight in [0, 1] per training example, and train each
trial for :math:`S` plain steps; ``tpe_sh`` reports the validation accuracy
on a quarter of the validation set after each quarter of training and is
pruned by successive halving. The best complete trial by validation
accuracy is tested.
"""

import dataclasses
import functools
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optuna

import gradhpo as gh
from hpo import tasks

#: Methods trained only once (budget 1): references, not searches.
REFERENCES = ("default", "oracle")
GRADHPO = ("gh_t1t2", "gh_greedy", "gh_implicit")
OPTUNA = ("random", "tpe", "tpe_sh")
METHODS = REFERENCES + ("default_full_budget",) + GRADHPO + OPTUNA


@dataclasses.dataclass(frozen=True)
class Config:
    """The training setup shared by every method.

    Attributes:
      steps: :math:`S`, the training length of a tested model.
      batch_size: :math:`m`, training (and hyper-step validation) batch.
      lr: the model's SGD learning rate (every method, every round).
      hyper_lr: Adam's learning rate on the example-weight logits.
      greedy_horizon: inner steps per ``gh.Greedy`` call.
      implicit_interval, implicit_terms: ``gh.Implicit``'s
        ``hyper_interval`` and CG iterations.
      tpe_startup: TPE's random start-up trials.
      sh_reports: validation reports per ``tpe_sh`` trial.
    """
    steps: int = 500
    batch_size: int = 100
    lr: float = 0.1
    hyper_lr: float = 0.1
    greedy_horizon: int = 5
    implicit_interval: int = 10
    implicit_terms: int = 5
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
    epochs = -(-steps * m // n) + 1
    flat = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    per_epoch = n // m
    rows = [flat[e * n:e * n + per_epoch * m].reshape(per_epoch, m)
            for e in range(epochs)]
    return np.concatenate(rows)[:steps].astype(np.int32)


@functools.partial(jax.jit, static_argnames=("lr",))
def train(params, weights, x, y, order, lr):
    """Plain SGD on the weighted loss for ``len(order)`` steps (the same
    inner step as the gradhpo methods' ``optax.sgd(lr)``)."""
    def body(p, idx):
        g = jax.grad(tasks.weighted_loss)(p, weights[idx],
                                          (x[idx], y[idx], idx))
        return jax.tree.map(lambda q, gq: q - lr * gq, p, g), None
    return jax.lax.scan(body, params, order)[0]


@jax.jit
def _gather(x, y, idx):
    return x[idx], y[idx], idx


class Ledger:
    """Counts what a method spends, by kind (all in G)."""

    def __init__(self, task: tasks.Task, cfg: Config, budget: int) -> None:
        self.task, self.cfg = task, cfg
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

    def train(self, params, weights, order):
        self.plain_steps += len(order)
        return train(params, weights, self.task.x_train, self.task.y_train,
                     jnp.asarray(order), self.cfg.lr)

    def validate(self, params, n: Optional[int] = None) -> float:
        """Validation accuracy on the first ``n`` validation examples."""
        n = self.task.n_val if n is None else n
        self.evaluated += n
        acc, _ = tasks.evaluate(params, self.task.x_val[:n],
                                self.task.y_val[:n])
        return float(acc)

    def result(self, params, val_accuracy: float, **extra) -> Dict[str, Any]:
        """The row fields of the tested model (test set used only here)."""
        acc, loss = tasks.evaluate(params, self.task.x_test,
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


# -- fixed weights ---------------------------------------------------------

def run_fixed(method: str, task: tasks.Task, cfg: Config, budget: int,
              seed: int) -> Dict[str, Any]:
    """``default`` (all weights 1), ``oracle`` (1 on clean examples, 0 on
    corrupted ones), ``default_full_budget`` (all 1, trained for as many
    steps as the budget pays)."""
    led = Ledger(task, cfg, budget)
    if method == "oracle":
        weights = jnp.asarray(task.clean, jnp.float32)
    else:
        weights = jnp.ones(task.n_train)
    steps = cfg.steps
    if method == "default_full_budget":
        steps = int(led.limit - eval_cost(task.n_val, cfg))
    order = batch_order(task.n_train, cfg.batch_size, steps, _rng(seed, 1, 0))
    params = led.train(tasks.init_params(task), weights, order)
    led.models = 1
    return led.result(params, led.validate(params), train_steps=steps)


# -- gradhpo ---------------------------------------------------------------

def make_optimizer(method: str, cfg: Config) -> gh.BilevelOptimizer:
    """The gradhpo optimizer of a method (SGD inside, Adam outside)."""
    inner, outer = optax.sgd(cfg.lr), optax.adam(cfg.hyper_lr)
    if method == "gh_t1t2":
        return gh.T1T2(tasks.train_loss, tasks.val_loss, inner, outer)
    if method == "gh_greedy":
        return gh.Greedy(tasks.train_loss, tasks.val_loss, inner, outer,
                         horizon=cfg.greedy_horizon, gamma=0.9)
    if method == "gh_implicit":
        return gh.Implicit(tasks.train_loss, tasks.val_loss, inner, outer,
                           solver="cg", terms=cfg.implicit_terms,
                           hyper_interval=cfg.implicit_interval)
    raise ValueError(f"unknown gradhpo method {method!r}")


def block_shape(method: str, cfg: Config):
    """(calls, model steps per call) of one accounting block: one call,
    but ``hyper_interval`` calls for Implicit (one hyper-update each)."""
    if method == "gh_greedy":
        return 1, cfg.greedy_horizon
    if method == "gh_implicit":
        return cfg.implicit_interval, 1
    return 1, 1


class _Batches:
    """The training and validation batches of one round."""

    def __init__(self, task, cfg, method, order, val_order):
        self.task, self.order, self.val_order = task, order, val_order
        _, self.per_call = block_shape(method, cfg)

    def call(self, start: int):
        t = self.task
        rows = (start if self.per_call == 1
                else slice(start, start + self.per_call))
        tr = _gather(t.x_train, t.y_train, jnp.asarray(self.order[rows]))
        vx, vy, _ = _gather(t.x_val, t.y_val,
                            jnp.asarray(self.val_order[rows]))
        return tr, (vx, vy)


def probe_block_cost(opt, method, task, cfg) -> float:
    """What the library charges for one accounting block, read from the
    metadata of a scratch state (run once, not kept, not charged: the
    counts are fixed when the step is compiled)."""
    calls, per_call = block_shape(method, cfg)
    order = batch_order(task.n_train, cfg.batch_size, calls * per_call,
                        _rng(0, 9))
    val_order = batch_order(task.n_val, cfg.batch_size, calls * per_call,
                            _rng(0, 10))
    batches = _Batches(task, cfg, method, order, val_order)
    state = opt.init(tasks.init_params(task),
                     {"logit": jnp.zeros(task.n_train)})
    for c in range(calls):
        state = opt.step(state, *batches.call(c * per_call))
    return float(state.metadata["grad_evals"])


def run_gradhpo(method: str, task: tasks.Task, cfg: Config, budget: int,
                seed: int) -> Dict[str, Any]:
    """Rounds of online tuning of the example weights (module docstring)."""
    opt = make_optimizer(method, cfg)
    calls, per_call = block_shape(method, cfg)
    block_steps = calls * per_call
    block_cost = probe_block_cost(opt, method, task, cfg)
    e = eval_cost(task.n_val, cfg)
    led = Ledger(task, cfg, budget)
    logit = jnp.zeros(task.n_train)
    best = (-1.0, None, -1)
    rnd = 0
    while rnd == 0 or led.left() >= cfg.steps + e:
        order = batch_order(task.n_train, cfg.batch_size, cfg.steps,
                            _rng(seed, 1, rnd))
        val_order = batch_order(task.n_val, cfg.batch_size, cfg.steps,
                                _rng(seed, 2, rnd))
        batches = _Batches(task, cfg, method, order, val_order)
        state = opt.init(tasks.init_params(task), {"logit": logit})
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
        logit = state.hyperparams["logit"]
        params = state.params
        if done < cfg.steps:
            params = led.train(params, jax.nn.sigmoid(logit), order[done:])
        led.models += 1
        acc = led.validate(params)
        if acc > best[0]:
            best = (acc, params, rnd)
        rnd += 1
    w = jax.nn.sigmoid(logit)
    clean = jnp.asarray(task.clean)
    return led.result(
        best[1], best[0], best_round=best[2],
        block_grad_evals=block_cost, block_steps=block_steps,
        final_weight_clean=float(jnp.mean(jnp.where(clean, w, 0.0))
                                 / max(task.clean.mean(), 1e-9)),
        final_weight_corrupted=float(
            jnp.mean(jnp.where(clean, 0.0, w))
            / max(1.0 - task.clean.mean(), 1e-9)))


# -- Optuna ----------------------------------------------------------------

def run_optuna(method: str, task: tasks.Task, cfg: Config, budget: int,
               seed: int) -> Dict[str, Any]:
    """Black-box search over the per-example weights (module docstring)."""
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
    led = Ledger(task, cfg, budget)
    e = eval_cost(task.n_val, cfg)
    reports = cfg.sh_reports if pruned else 1
    sub = task.n_val // reports
    full = cfg.steps + e + (reports - 1) * eval_cost(sub, cfg)
    models = {}
    while led.models == 0 or led.left() >= full:
        trial = study.ask()
        weights = jnp.asarray([trial.suggest_float(f"w{i}", 0.0, 1.0)
                               for i in range(task.n_train)], jnp.float32)
        order = batch_order(task.n_train, cfg.batch_size, cfg.steps,
                            _rng(seed, 1, trial.number))
        params = tasks.init_params(task)
        led.models += 1
        chunk = cfg.steps // reports
        state = optuna.trial.TrialState.COMPLETE
        for r in range(reports):
            stop = cfg.steps if r == reports - 1 else (r + 1) * chunk
            params = led.train(params, weights, order[r * chunk:stop])
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


def run(method: str, task: tasks.Task, cfg: Config, budget: int,
        seed: int) -> Dict[str, Any]:
    """One row's measurements (plus ``seconds``) for a method."""
    start = time.perf_counter()
    if method in GRADHPO:
        out = run_gradhpo(method, task, cfg, budget, seed)
    elif method in OPTUNA:
        out = run_optuna(method, task, cfg, budget, seed)
    elif method in METHODS:
        out = run_fixed(method, task, cfg, budget, seed)
    else:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    out["seconds"] = time.perf_counter() - start
    return out
